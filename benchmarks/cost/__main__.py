from benchmarks.cost.run import main

main()
