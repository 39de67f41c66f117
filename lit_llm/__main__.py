from lit_llm.cli import main

main()
