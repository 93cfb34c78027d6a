from cqrs_pg.cli import main

main()
