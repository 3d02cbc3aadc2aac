from shardchat.cli import main

main()
