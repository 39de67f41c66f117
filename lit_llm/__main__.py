from lit_llm.cli import console_main

console_main()
