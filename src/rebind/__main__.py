from rebind.cli.entry import main

main()
