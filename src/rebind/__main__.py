from rebind.cli.main import main

main()
