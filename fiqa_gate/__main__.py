from fiqa_gate.cli import main

main()
