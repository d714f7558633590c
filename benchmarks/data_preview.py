"""What the data preview costs on top of the preparation a training run does anyway: ``preview_data`` (preparation
with a trace, one epoch of padded — and packed — batches, decoding the records shown, both renderings) against
``prepare_for`` alone (what ``train`` runs before step 1), on the same records, interleaved, medians.

    python benchmarks/data_preview.py [--records 20000] [--seq 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import jupyter_lora as jl
    import jupyter_lora.data_preview as rendering
    from jupyter_lora.core.train import make_train_config, prepare_for
    from jupyter_lora.testing import tiny_model, tiny_tokenizer

    model, tok = tiny_model("llama"), tiny_tokenizer()
    records = [
        {"prompt": f"Question {i}: " + "context " * (i % 40), "response": "answer " * (i % 90 + 1)}
        for i in range(args.records)
    ]
    settings = dict(seq=args.seq, eval=0.1)
    config = make_train_config(**settings)

    def prepare() -> None:
        prepare_for(model, config, records, tok, None)

    def preview(packing: bool) -> None:
        rendering._PLOTLY_JS_SENT = True  # plotly.js goes out once per page: time the usual case
        shown = jl.preview_data(model, records, tok, packing=packing, **settings)
        shown._repr_html_()
        repr(shown)

    runs: dict[str, list[float]] = {
        "prepare_for (training)": [],
        "preview_data": [],
        "preview_data, packing": [],
    }
    for _ in range(args.repeats):
        for name, call in (
            ("prepare_for (training)", prepare),
            ("preview_data", lambda: preview(False)),
            ("preview_data, packing", lambda: preview(True)),
        ):
            start = time.perf_counter()
            call()
            runs[name].append(time.perf_counter() - start)
    base = statistics.median(runs["prepare_for (training)"])
    print(f"{args.records:,} prompt/response records, seq {args.seq}, {args.repeats} interleaved repeats")
    for name, times in runs.items():
        median = statistics.median(times)
        print(f"  {name:<24} median {median:6.2f} s  min {min(times):6.2f} s  {median / base:5.2f}x")


if __name__ == "__main__":
    main()
