"""The tiny Hugging Face Llama folders of ``tests/hf_fixtures.py`` load with transformers' Auto classes and
carry each family's tokenizer, chat template and stop tokens."""

from __future__ import annotations

import json

import pytest
import torch

from tests.hf_fixtures import (
    LLAMA3_ROPE_SCALING,
    SMOL_SYSTEM,
    TEMPLATES,
    make_hf_llama,
    write_legacy_rope_config,
)

transformers = pytest.importorskip("transformers")

EXTRA_VOCAB = {"chatml": 0, "llama3": 11, "nosystem": 3}
CHAT = [
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": " 2 + 3 = 5. "},  # the llama3 and nosystem templates trim content
]
RENDERED = {
    "chatml": (
        f"<|im_start|>system\n{SMOL_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
        "<|im_start|>assistant\n 2 + 3 = 5. <|im_end|>\n"
    ),
    "llama3": (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2 + 3?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n2 + 3 = 5.<|eot_id|>"
    ),
    "nosystem": (
        "<bos><start_of_turn>user\nWhat is 2 + 3?<end_of_turn>\n<start_of_turn>model\n2 + 3 = 5.<end_of_turn>\n"
    ),
}
PROMPT = {  # the first turn with the generation prompt
    "chatml": RENDERED["chatml"].split("<|im_start|>assistant")[0] + "<|im_start|>assistant\n",
    "llama3": RENDERED["llama3"].split("2 + 3 = 5.")[0],
    "nosystem": RENDERED["nosystem"].split("2 + 3 = 5.")[0],
}
STOPS = {
    "chatml": ["<|im_end|>"],
    "llama3": ["<|end_of_text|>", "<|eot_id|>"],
    "nosystem": ["<eos>", "<end_of_turn>"],
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_llama")
    return {t: make_hf_llama(root / t, t, extra_vocab=EXTRA_VOCAB[t]) for t in TEMPLATES}


def _load(folder):
    tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    return tok, model


@pytest.mark.parametrize("template", TEMPLATES)
def test_folder_loads_offline_with_its_tokenizer(folders, template):
    folder = folders[template]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).is_file(), name
    tok, model = _load(folder)
    assert isinstance(model, transformers.LlamaForCausalLM)
    assert model.config.vocab_size == len(tok) + EXTRA_VOCAB[template]
    assert model.get_input_embeddings().weight.shape[0] == model.config.vocab_size

    text = "Alice has 3 apples. What is 2 + 3?"
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text
    assert len(ids) < len(text) // 2  # a trained BPE, not bytes
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), model.config.vocab_size)

    stop_ids = [tok.convert_tokens_to_ids(t) for t in STOPS[template]]
    gen = json.loads((folder / "generation_config.json").read_text())
    assert gen["eos_token_id"] == (stop_ids[0] if len(stop_ids) == 1 else stop_ids)
    assert gen["bos_token_id"] == tok.bos_token_id
    assert all(t in tok.convert_ids_to_tokens(list(range(len(tok)))) for t in STOPS[template])


@pytest.mark.parametrize("template", TEMPLATES)
def test_chat_template_renders(folders, template):
    tok = transformers.AutoTokenizer.from_pretrained(folders[template], local_files_only=True)
    assert tok.apply_chat_template(CHAT, tokenize=False) == RENDERED[template]
    assert tok.apply_chat_template(CHAT[:1], tokenize=False, add_generation_prompt=True) == PROMPT[template]
    # Tokenized, the special tokens are single ids and the template's BOS is not doubled.
    ids = tok.apply_chat_template(CHAT, return_dict=False)
    assert tok.decode(ids) == RENDERED[template]
    stop = STOPS[template][-1]
    assert ids.count(tok.convert_tokens_to_ids(stop)) == RENDERED[template].count(stop) >= 2


def test_chatml_keeps_a_given_system_prompt(folders):
    tok = transformers.AutoTokenizer.from_pretrained(folders["chatml"], local_files_only=True)
    chat = [{"role": "system", "content": "Be brief."}, *CHAT]
    text = tok.apply_chat_template(chat, tokenize=False)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert SMOL_SYSTEM not in text


def test_nosystem_rejects_system_and_non_alternating_roles(folders):
    tok = transformers.AutoTokenizer.from_pretrained(folders["nosystem"], local_files_only=True)
    with pytest.raises(Exception, match="System role not supported"):
        tok.apply_chat_template([{"role": "system", "content": "Be brief."}, *CHAT], tokenize=False)
    with pytest.raises(Exception, match="must alternate"):
        tok.apply_chat_template([CHAT[0], CHAT[0]], tokenize=False)


def test_special_tokens_added_on_encode(folders):
    llama3 = transformers.AutoTokenizer.from_pretrained(folders["llama3"], local_files_only=True)
    plain = llama3("Alice has 3 apples.", add_special_tokens=False).input_ids
    assert llama3("Alice has 3 apples.", add_special_tokens=True).input_ids == [llama3.bos_token_id, *plain]
    assert llama3.bos_token == "<|begin_of_text|>" and llama3.pad_token is None
    for template in ("chatml", "nosystem"):  # these add nothing to plain text
        tok = transformers.AutoTokenizer.from_pretrained(folders[template], local_files_only=True)
        assert (
            tok("Alice has 3 apples.").input_ids
            == tok("Alice has 3 apples.", add_special_tokens=False).input_ids
        )


def test_seed_sizes_and_rope_scaling(tmp_path):
    a = make_hf_llama(
        tmp_path / "a", "llama3", seed=1, tie_embeddings=False, rope_scaling=LLAMA3_ROPE_SCALING
    )
    b = make_hf_llama(
        tmp_path / "b", "llama3", seed=1, tie_embeddings=False, rope_scaling=LLAMA3_ROPE_SCALING
    )
    c = make_hf_llama(tmp_path / "c", "llama3", seed=2, n_layer=1, n_embd=32, n_head=2, n_kv_head=1)
    ma, mb, mc = (
        transformers.AutoModelForCausalLM.from_pretrained(p, local_files_only=True) for p in (a, b, c)
    )
    sa, sb = ma.state_dict(), mb.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(ma.lm_head.weight, ma.model.embed_tokens.weight)
    assert mc.lm_head.weight is mc.model.embed_tokens.weight  # tied by default
    assert (mc.config.num_hidden_layers, mc.config.hidden_size, mc.config.num_key_value_heads) == (1, 32, 1)
    assert ma.config.rope_parameters["rope_type"] == "llama3"
    assert ma.config.rope_parameters["factor"] == 8.0
    assert mc.config.rope_parameters["rope_type"] == "default"

    # The transformers 4.x layout of config.json (rope_theta + rope_scaling) loads to the same parameters.
    write_legacy_rope_config(a)
    cfg = json.loads((a / "config.json").read_text())
    assert "rope_parameters" not in cfg and cfg["rope_theta"] == 500000.0
    assert cfg["rope_scaling"]["rope_type"] == "llama3"
    legacy = transformers.AutoConfig.from_pretrained(a, local_files_only=True)
    assert legacy.rope_parameters == ma.config.rope_parameters


def test_unknown_template(tmp_path):
    with pytest.raises(ValueError, match="unknown template"):
        make_hf_llama(tmp_path, "mistral")
