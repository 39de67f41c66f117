"""Tiny random Hugging Face Llama model folders with real-format tokenizer files, for tests.

``make_hf_llama(folder, template)`` writes what a Hub checkpoint ships: ``config.json`` and
``model.safetensors`` (a ``LlamaForCausalLM`` with random weights), ``generation_config.json``, and the
tokenizer files written by ``transformers`` itself (``tokenizer.json``, ``tokenizer_config.json`` and, in
transformers 5, ``chat_template.jinja``). The tokenizer is a byte-level BPE trained here on a small built-in
English text, with the special tokens and chat template of one model family:

* ``"chatml"`` (SmolLM2-Instruct-like): ``<|endoftext|>`` (id 0), ``<|im_start|>``, ``<|im_end|>`` first in the
  vocabulary; ChatML that inserts a default system prompt when the first message is not a system one.
* ``"llama3"`` (Llama-3.x-Instruct-like): five header/turn tokens appended after the BPE vocabulary, a
  post-processor that prepends ``<|begin_of_text|>`` to encoded text, no pad token, two stop ids.
* ``"nosystem"`` (a Gemma-like template on a Llama model): ``<pad>``, ``<eos>``, ``<bos>`` first, turn
  tokens appended; the template raises on a system message and on roles that do not alternate.

Everything runs offline and takes a fraction of a second per folder once the BPE of a template is trained
(cached per process).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

TEMPLATES = ("chatml", "llama3", "nosystem")

SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + SMOL_SYSTEM + "<|im_end|>\\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

NOSYSTEM_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)

# Per family: special tokens placed before the BPE vocabulary (ids 0, 1, ...), special tokens appended
# after it, the tokenizer_config roles and extra special tokens, the generation stop tokens, the chat
# template and the RoPE base.
FAMILIES = {
    "chatml": dict(
        leading=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        trailing=[],
        roles=dict(
            bos_token="<|im_start|>",
            eos_token="<|im_end|>",
            pad_token="<|im_end|>",
            unk_token="<|endoftext|>",
        ),
        extra=["<|im_start|>", "<|im_end|>"],
        stop=["<|im_end|>"],
        template=CHATML_TEMPLATE,
        rope_theta=100000.0,
    ),
    "llama3": dict(
        leading=[],
        trailing=[
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ],
        roles=dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"),
        extra=[],  # as Llama 3 ships it: the header tokens are special only in tokenizer.json
        stop=["<|end_of_text|>", "<|eot_id|>"],
        template=LLAMA3_TEMPLATE,
        rope_theta=500000.0,
    ),
    "nosystem": dict(
        leading=["<pad>", "<eos>", "<bos>"],
        trailing=["<start_of_turn>", "<end_of_turn>"],
        roles=dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"),
        extra=["<start_of_turn>", "<end_of_turn>"],
        stop=["<eos>", "<end_of_turn>"],
        template=NOSYSTEM_TEMPLATE,
        rope_theta=10000.0,
    ),
}

# A Llama 3.1-style rope_scaling for callers that want one (scaled to the tiny context).
LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

BPE_VOCAB = 512  # the trained vocabulary, leading special tokens included (trailing ones come on top)

CORPUS = """\
Alice is in the garden. Alice has three apples and two pears. Bob is in the kitchen with a red cup.
Carol walks to the market every morning. She buys bread, milk and seven eggs. Dave reads a book about
the sea. The book has two hundred pages. Eve keeps four cats and one dog at home. The dog is called Max.
Frank has a blue bicycle. He rides it to school on Monday, Tuesday and Friday. Grace plants ten flowers
near the old tree. The tree is taller than the house. Henry counts the coins in his box: there are
twelve coins. Iris paints a picture of a boat on a lake. The boat is small and white.
Jack gives Alice one apple, so Alice now has four apples. Kate has six pencils and loses two of them.
How many pencils does Kate have? Kate has four pencils. Leo is older than Mia, and Mia is older than Noah.
Who is the youngest? Noah is the youngest. The train leaves at nine and arrives at eleven.
The trip takes two hours. A week has seven days and a year has twelve months.
Question: What is 2 + 3? Answer: 2 + 3 = 5. Question: What is 7 - 4? Answer: 7 - 4 = 3.
Question: What is 6 * 2? Answer: 6 * 2 = 12. Question: What is 10 / 5? Answer: 10 / 5 = 2.
What is 8 + 1? The answer is 9. What is 15 - 6? The answer is 9. What is 3 * 3? The answer is 9.
User: Where is Bob? Assistant: Bob is in the kitchen. User: What does Bob have? Assistant: A red cup.
User: Can you help me write a short poem? Assistant: Of course. Here is a short poem about the rain.
The rain falls soft on the window, the street is quiet and grey, and the children wait for the sun.
Please answer the question in one sentence. Thank you for your help! You are welcome.
The numbers 0, 1, 2, 3, 4, 5, 6, 7, 8, 9 and 100 are written with digits.
Oliver put the keys on the table, then he took them back. Where are the keys now? Oliver has the keys.
Paula and Quinn play chess in the park. Paula wins the first game and Quinn wins the second one.
Rosa has a green hat, a yellow scarf and black shoes. The shop opens at eight and closes at six.
Sam is hungry, so he eats a sandwich and drinks a glass of water. Tina sings a song for her friends.
"""


def _corpus_lines() -> list[str]:
    return [line for line in CORPUS.splitlines() if line.strip()]


@functools.cache
def _tokenizer_json(template: str) -> str:
    """The serialized ``tokenizers.Tokenizer`` of ``template`` (trained once per process)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    fam = FAMILIES[template]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB,
        special_tokens=fam["leading"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_lines(), trainer)
    if fam["trailing"]:
        tok.add_special_tokens(fam["trailing"])
    if template == "llama3":
        bos = "<|begin_of_text|>"
        tok.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"{bos} $A",
                    pair=f"{bos} $A {bos}:1 $B:1",
                    special_tokens=[(bos, tok.token_to_id(bos))],
                ),
            ]
        )
    return tok.to_str()


def make_tokenizer(template: str = "chatml", model_max_length: int | None = None):
    """A fresh ``PreTrainedTokenizerFast`` of ``template`` (not saved anywhere)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if template not in FAMILIES:
        raise ValueError(f"unknown template {template!r}; expected one of {TEMPLATES}")
    fam = FAMILIES[template]
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(template)),
        chat_template=fam["template"],
        extra_special_tokens=list(fam["extra"]),
        **({} if model_max_length is None else {"model_max_length": model_max_length}),
        **fam["roles"],
    )


def make_hf_llama(
    folder: Path,
    template: str = "chatml",
    *,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_kv_head: int = 2,
    intermediate_size: int = 128,
    tie_embeddings: bool = True,
    rope_scaling: dict | None = None,
    max_position_embeddings: int = 256,
    seed: int = 0,
    extra_vocab: int = 0,
) -> Path:
    """Write a tiny random ``LlamaForCausalLM`` folder of chat family ``template`` into ``folder``.

    The model's ``vocab_size`` is ``len(tokenizer) + extra_vocab`` (the padded embedding of many real
    checkpoints). ``rope_scaling`` (e.g. ``LLAMA3_ROPE_SCALING``) is passed to ``LlamaConfig`` as is.
    The weights depend only on ``seed`` and the sizes; the global torch RNG is left as it was."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(template, model_max_length=max_position_embeddings)  # raises on unknown template
    fam = FAMILIES[template]
    bos = tok.convert_tokens_to_ids(fam["roles"]["bos_token"])
    stop = [tok.convert_tokens_to_ids(t) for t in fam["stop"]]
    eos = stop[0] if len(stop) == 1 else stop
    pad = tok.pad_token_id

    config = LlamaConfig(
        vocab_size=len(tok) + extra_vocab,
        hidden_size=n_embd,
        intermediate_size=intermediate_size,
        num_hidden_layers=n_layer,
        num_attention_heads=n_head,
        num_key_value_heads=n_kv_head,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_theta=fam["rope_theta"],
        rope_scaling=dict(rope_scaling) if rope_scaling is not None else None,
        tie_word_embeddings=tie_embeddings,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def write_legacy_rope_config(folder: Path) -> Path:
    """Rewrite ``folder/config.json`` the way transformers 4.x wrote it and most Hub checkpoints still ship
    it: ``rope_theta`` at the top level and ``rope_scaling`` (``null`` when unscaled) instead of
    transformers 5's ``rope_parameters``."""
    path = Path(folder) / "config.json"
    cfg = json.loads(path.read_text())
    params = dict(cfg.pop("rope_parameters", None) or {})
    cfg["rope_theta"] = params.pop("rope_theta", 10000.0)
    if params.get("rope_type", "default") == "default":
        cfg["rope_scaling"] = None
    else:
        params.pop("type", None)
        cfg["rope_scaling"] = params
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return path
