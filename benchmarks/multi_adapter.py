"""Serving several adapters from one base: N prompts through K adapters as ONE mixed batch (``jupyter_lora.generate``,
PEFT's ``adapter_names``) against switching adapters one after the other (``set_adapter`` + ``generate`` per
adapter, the same N prompts each time). Tokens/s of each and the ratio, on a Llama built from a config (random
weights), greedy, every row forced to ``--new-tokens`` tokens (``min_new_tokens``) so both count the same work.

    python benchmarks/multi_adapter.py [--device cpu|cuda] [--prompts 8] [--adapters 4] [--new-tokens 32]
                                       [--hidden 256] [--layers 4] [--repeats 3]

Rounds are interleaved (mixed, sequential, mixed, ...); medians and the slowest round are printed. The outputs of
the two are compared token for token first (they must agree).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def build(args: argparse.Namespace):
    from transformers import LlamaConfig, LlamaForCausalLM

    import jupyter_lora as jl
    from jupyter_lora.testing import tiny_tokenizer

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4, num_hidden_layers=args.layers,
                         num_attention_heads=max(args.hidden // 64, 1), num_key_value_heads=max(args.hidden // 256, 1),
                         vocab_size=max(args.vocab, 98), max_position_embeddings=512)  # fmt: skip
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = LlamaForCausalLM(config).to(args.device, dtype).eval()
    names = [f"task{k}" for k in range(args.adapters)]
    g = torch.Generator().manual_seed(1)
    for name in names:
        model = jl.inject(model, name=name, r=args.r, targets="all-linear")
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if f"lora_B.{name}." in pname:
                    p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.device, p.dtype))
    prompts = [f"Prompt number {i}: tell me about item {i * 7 % 13}" for i in range(args.prompts)]
    return model, tiny_tokenizer(), names, prompts


def mixed(model, tok, names, prompts, n):
    import jupyter_lora as jl

    _sync()
    start = time.perf_counter()
    out = jl.generate(model, prompts, names, tokenizer=tok, max_new_tokens=n, min_new_tokens=n)
    _sync()
    return time.perf_counter() - start, out.new_tokens, {(r.prompt, r.adapter): r.text for r in out}


def sequential(model, tok, names, prompts, n):
    """The usual way without mixed batches: for each adapter, set_adapter and generate the N prompts."""
    encoded = [tok(p)["input_ids"] for p in prompts]
    width = max(map(len, encoded))
    ids = torch.tensor([[0] * (width - len(x)) + x for x in encoded], device=model.device)
    mask = (torch.arange(width, device=model.device)[None, :] >= (width - torch.tensor([len(x) for x in encoded],
            device=model.device))[:, None]).long()  # fmt: skip
    texts, tokens = {}, 0
    _sync()
    start = time.perf_counter()
    with torch.no_grad():
        for name in names:
            model.set_adapter(name)
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=0)  # fmt: skip
            new = out[:, width:]
            tokens += new.numel()
            for p, row in zip(prompts, new.tolist(), strict=True):
                texts[(p, name)] = tok.decode(row, skip_special_tokens=True)
    _sync()
    return time.perf_counter() - start, tokens, texts


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model, tok, names, prompts = build(args)
    n = args.new_tokens
    a, b = mixed(model, tok, names, prompts, 2), sequential(model, tok, names, prompts, 2)  # warm-up
    a, b = mixed(model, tok, names, prompts, n), sequential(model, tok, names, prompts, n)
    same = a[2] == b[2]
    rounds = {"mixed": [], "sequential": []}
    for _ in range(args.repeats):
        t, tokens, _ = mixed(model, tok, names, prompts, n)
        rounds["mixed"].append(tokens / t)
        t, tokens, _ = sequential(model, tok, names, prompts, n)
        rounds["sequential"].append(tokens / t)
    params = sum(p.numel() for p in model.parameters())
    print(f"Llama hidden {args.hidden} × {args.layers} layers ({params / 1e6:.1f}M parameters), {args.device}, "
          f"{len(prompts)} prompts × {len(names)} LoRA adapters (r={args.r}, all linear), {n} new tokens each, "
          f"{args.repeats} interleaved rounds")  # fmt: skip
    print(f"outputs equal token for token: {same}")
    base = statistics.median(rounds["sequential"])
    print(f"{'':34} {'tokens/s (median)':>18} {'slowest round':>14} {'× sequential':>13}")
    for key, label in (
        ("sequential", "set_adapter + generate per adapter"),
        ("mixed", "one mixed batch (generate)"),
    ):
        med, low = statistics.median(rounds[key]), min(rounds[key])
        print(f"{label:34} {med:18,.0f} {low:14,.0f} {med / base:13.2f}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
