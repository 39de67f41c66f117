"""Parity with Hugging Face ``Llama4ForCausalLM`` (logits, greedy tokens, layer patterns) and the
export / import round trip through ``from_pretrained`` for Llama and Llama 4."""

from __future__ import annotations

import pytest
import torch

from lit_llm.backbone import ModelConfig, Transformer
from lit_llm.backbone.generate import generate
from lit_llm.formats.hf import (
    config_from_hf_llama4,
    export_hf,
    from_hf,
    hf_config_dict,
    import_hf,
    state_dict_to_hf,
    to_hf,
)
from lit_llm.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

BASE = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=16,
    intermediate_size_mlp=24,
    num_hidden_layers=4,
    num_attention_heads=4,
    head_dim=8,
    max_position_embeddings=64,
    num_local_experts=4,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
)
CASES = {
    # GQA, tied, MoE on every layer (top-1 sigmoid + shared expert), NoPE every 2nd layer, chunks of 4
    # tokens (shorter than the 11-token prompt), QK-norm, temperature tuning visible from position 1.
    "gqa-tied-chunked-qknorm-temp": dict(
        num_key_value_heads=2,
        tie_word_embeddings=True,
        interleave_moe_layer_step=1,
        no_rope_layer_interval=2,
        attention_chunk_size=4,
        use_qk_norm=True,
        attn_temperature_tuning=True,
        floor_scale=2,
        attn_scale=0.5,
    ),
    # MHA, untied, MoE interleaved with dense layers (1 and 3), NoPE on layer 2, no chunking or QK-norm.
    "mha-untied-interleaved": dict(
        num_key_value_heads=4,
        tie_word_embeddings=False,
        interleave_moe_layer_step=2,
        no_rope_layer_interval=3,
        attention_chunk_size=None,
        use_qk_norm=False,
        attn_temperature_tuning=True,
        floor_scale=3,
        attn_scale=0.3,
    ),
    # MQA, top-2 sigmoid, Llama-3 RoPE scaling, chunk 5, every layer RoPE.
    "mqa-top2-llama3rope": dict(
        num_key_value_heads=1,
        num_experts_per_tok=2,
        no_rope_layer_interval=8,
        attention_chunk_size=5,
        use_qk_norm=True,
        attn_temperature_tuning=False,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 1000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    # a dense Llama 4 (no MoE layer at all)
    "dense": dict(num_key_value_heads=2, interleave_moe_layer_step=5, attention_chunk_size=3),
}


def hf_llama4(case: str, seed: int = 0):
    torch.manual_seed(seed)
    ref = transformers.Llama4ForCausalLM(transformers.Llama4TextConfig(**{**BASE, **CASES[case]})).eval()
    with torch.no_grad():  # larger weights than the default init, so that every feature shows in the logits
        for p in ref.parameters():
            p.normal_(0.0, 0.15) if p.ndim > 1 else p.normal_(1.0, 0.2)
    ref.generation_config.eos_token_id = None  # decode the full length, as ours does without stop tokens
    return ref


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_greedy_tokens_match_hf_llama4(case):
    ref = hf_llama4(case)
    ours = from_hf(ref).eval()
    x = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        want = ref(x).logits
        torch.testing.assert_close(ours(x), want, atol=1e-5, rtol=1e-5)
        # and back: our weights in a fresh Hugging Face model give the same logits
        torch.testing.assert_close(to_hf(ours)(x).logits, want, atol=1e-5, rtol=1e-5)
        got = generate(ours, [x[0].tolist()], 10).response_lists()[0]
        theirs = ref.generate(x[:1], max_new_tokens=10, do_sample=False)[0, 11:].tolist()
    assert got == theirs


def test_parity_cases_exercise_their_features():
    """Turning a feature off changes the logits: the parity above would catch a wrong implementation."""
    ref = hf_llama4("gqa-tied-chunked-qknorm-temp")
    ours = from_hf(ref).eval()
    x = torch.randint(0, 97, (1, 11))
    with torch.no_grad():
        base = ours(x)
        for off in (
            dict(attention_chunk_size=None),
            dict(qk_norm=False),
            dict(attn_temperature_tuning=False),
            dict(nope_every=0),
        ):
            other = Transformer(ModelConfig(**{**ours.config.to_dict(), **off})).eval()
            other.load_state_dict(ours.state_dict())
            assert (other(x) - base).abs().max() > 1e-2, off


@pytest.mark.parametrize("L,step,interval", [(4, 1, 4), (6, 2, 3), (7, 3, 2), (3, 4, 5), (8, 2, 1)])
def test_layer_patterns_follow_hf(L, step, interval):
    hf = transformers.Llama4TextConfig(
        **{**BASE, "num_hidden_layers": L, "num_key_value_heads": 2},
        interleave_moe_layer_step=step,
        no_rope_layer_interval=interval,
        attention_chunk_size=16,
    )
    ours = config_from_hf_llama4(hf)
    assert [i for i in range(L) if ours.is_moe_layer(i)] == list(hf.moe_layers)
    assert [int(not ours.is_nope_layer(i)) for i in range(L)] == list(hf.no_rope_layers)[:L]
    local = ["chunked_attention" if ours.is_local_layer(i) else "full_attention" for i in range(L)]
    assert local == list(hf.layer_types)
    back = hf_config_dict(ours, "llama4")
    assert back["moe_layers"] == list(hf.moe_layers)


def test_older_layer_type_labels_without_a_chunk_size_are_accepted():
    """transformers 5.17 labels RoPE layers "chunked_attention" even when attention_chunk_size is None."""
    L = BASE["num_hidden_layers"]
    old_labels = ["full_attention" if (i + 1) % 4 == 0 else "chunked_attention" for i in range(L)]
    ours = config_from_hf_llama4(
        {**BASE, "num_key_value_heads": 2, "attention_chunk_size": None, "layer_types": old_labels}
    )
    assert ours.attention_chunk_size is None and not any(ours.is_local_layer(i) for i in range(L))
    with pytest.raises(ValueError, match="layer_types"):  # a real mismatch is still refused
        config_from_hf_llama4(
            {**BASE, "attention_chunk_size": None, "layer_types": ["full_attention"] * 3 + ["x"]}
        )


def test_unexpressible_configs_are_refused_with_the_reason():
    tiny = dict(vocab_size=97, n_layer=2, n_embd=32, n_head=4)
    with pytest.raises(ValueError, match="sliding_window=4"):
        hf_config_dict(ModelConfig(**tiny, sliding_window=4))
    with pytest.raises(ValueError, match="moe_score='softmax'"):
        hf_config_dict(ModelConfig(**tiny, moe_n_expert=4, moe_top_k=2))
    with pytest.raises(ValueError, match="Llama checkpoint cannot express moe_n_expert=4"):
        hf_config_dict(ModelConfig(**tiny, moe_n_expert=4), arch="llama")
    with pytest.raises(ValueError, match="moe_layers \\[0, 2, 3\\] is not 'every n-th layer'"):
        config_from_hf_llama4(transformers.Llama4TextConfig(**BASE, moe_layers=[0, 2, 3]))
    with pytest.raises(ValueError, match="multimodal"):
        config_from_hf_llama4({"model_type": "llama4", "text_config": {}})
    with pytest.raises(ValueError, match="rope type 'yarn'"):
        config_from_hf_llama4({**BASE, "rope_parameters": {"rope_type": "yarn", "factor": 2.0}})
    biased = Transformer(
        ModelConfig(**tiny, moe_n_expert=4, moe_score="sigmoid", moe_weight_input=True, moe_bias_update=True)
    )
    state_dict_to_hf(biased.state_dict(), biased.config)  # a zero bias is fine
    biased.layers[1].mlp.expert_bias.fill_(0.5)
    with pytest.raises(ValueError, match="layer 1 has a non-zero expert selection bias"):
        state_dict_to_hf(biased.state_dict(), biased.config)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    text = "Alice has 3 apples. Bob is in the garden. The cat sleeps on the mat near the door."
    return Tokenizer.train([text] * 4, kind="bpe", vocab_size=300)


@pytest.mark.parametrize(
    "preset,tie,arch",
    [
        ("tiny", True, "LlamaForCausalLM"),
        ("tiny", False, "LlamaForCausalLM"),
        ("llama4-tiny", True, "Llama4ForCausalLM"),
        ("llama4-tiny", False, "Llama4ForCausalLM"),
    ],
)
def test_export_from_pretrained_import_round_trip(tmp_path, tokenizer, preset, tie, arch):
    torch.manual_seed(0)
    cfg = ModelConfig.from_name(
        preset, vocab_size=tokenizer.vocab_size, n_layer=4, n_embd=64, block_size=64, tie_embeddings=tie
    )
    model = Transformer(cfg).eval()
    export_hf(model, tokenizer, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == arch
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "Bob has 3 cats in the garden."
    ids = tokenizer.encode(text)
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids
    assert hf_tok.decode(ids) == tokenizer.decode(ids)
    assert hf_tok.pad_token_id == tokenizer.pad_id and hf_tok.eos_token_id == tokenizer.eos_id
    # generate stops at the end-of-turn token too: the generation config lists every stop id
    assert hf.generation_config.eos_token_id == [tokenizer.end_id, tokenizer.eos_id]
    msgs = [{"role": "user", "content": "Who has cats?"}, {"role": "assistant", "content": "Bob"}]
    want_ids = tokenizer.render_chat(msgs)[0]
    assert list(hf_tok.apply_chat_template(msgs, tokenize=True, return_dict=False)) == want_ids
    x = torch.tensor([ids])
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(hf(x).logits, want, atol=1e-5, rtol=1e-5)
        back, back_tok = import_hf(tmp_path)
        torch.testing.assert_close(back(x), want)
    assert back.config.diff(cfg) == {} and back_tok is not None and back_tok.to_str() == tokenizer.to_str()
    assert ("lm_head.weight" in {k for k, _ in hf.named_parameters()}) == (not tie)


def test_export_replaces_files_atomically(tmp_path, monkeypatch):
    """A failed export (here: disk full while writing the weights) leaves the previous export whole."""
    import safetensors.torch

    from lit_llm.formats.hf import export_hf

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, n_layer=1, n_embd=32, n_head=4)
    export_hf(Transformer(cfg), None, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save", disk_full)
    with pytest.raises(OSError, match="disk full"):
        export_hf(Transformer(cfg), None, tmp_path)  # other random weights
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp files, nothing changed
    monkeypatch.undo()
    # a failure at a later file (config.json, after the weights were written in full) must not leave new
    # weights beside the old config either: every file is staged before any is replaced
    import os

    real_fsync, synced = os.fsync, []

    def fsync_then_disk_full(fd):
        synced.append(fd)
        if len(synced) == 2:  # the second staged file
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_then_disk_full)
    with pytest.raises(OSError, match="disk full"):
        export_hf(Transformer(cfg), None, tmp_path)
    assert len(synced) == 2 and {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
