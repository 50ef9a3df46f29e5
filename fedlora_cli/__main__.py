from fedlora_cli.cli import main

main()
