from branchout.orchestrator.cli import main

main()
