"""Everything that crosses the project's border, one module per format.

- :mod:`lit_llm.formats.hf`: Hugging Face model folders (``config.json`` + safetensors + tokenizer files),
  both ways, dispatching on the architecture family: :mod:`~lit_llm.formats.llama` (Llama, Llama 3,
  SmolLM, TinyLlama) and :mod:`~lit_llm.formats.llama4` (Llama 4 text, and with images);
- :mod:`lit_llm.formats.gguf`: GGUF files for llama.cpp (export);
- :mod:`lit_llm.formats.peft`: PEFT LoRA adapter folders.

The tokenizer files and chat templates of any model are read and written by :mod:`lit_llm.tokenizer`.
"""
