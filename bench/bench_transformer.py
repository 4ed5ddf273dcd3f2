"""Benchmark: the transformer on WikiText-2 in ``simulate``, levels a to e, a few rounds each.

Paper settings (Table 6) where they fit a CPU budget: masked LM (15% of the
tokens masked), E = 1, B = 100, SGD lr 0.1, momentum 0.9, weight decay 5e-4,
gradient norm clipped to 1, IID split of contiguous stretches of the token
stream. Truncated to fit about 15 minutes on the project's 2-core machine:
the first 2,000 training rows of 64 tokens (6% of WikiText-2) for 10 clients
(200 rows each: two steps of B = 100 per round), 2 clients per round, 3
rounds per mode, and perplexity on the first 100 test rows (6,400 tokens, the
masks drawn from a fixed seed). Each mode runs on its own global model (mode
``e`` trains a global model of width 1/16). Sessions run one after another
(``--workers 1``): a level-a session holds about 4 GB of logits at B = 100.

Per round: the perplexity of the global model over the masked positions
(``exp`` of the mean loss), the time of the round and of its parts. After the
last round also the perplexity over *all* positions, the figure the official
HeteroFL code reports (the paper's Table 3: 3.37 at a to 7.41 at e after 100
rounds on all the data).

    .venv/bin/python bench/bench_transformer.py --data-dir ../shared/datasets/wikitext2
    .venv/bin/python bench/bench_transformer.py --modes a-e   # adds a mode to the results

``--dropout P`` trains a copy of the transformer with dropout P instead of the
paper's 0.2 (its runs are named ``MODE-dropout-P``): the exported on-device
programs have no dropout, and this measures what that changes, e.g.
``--modes c --rounds 8 --dropout 0 --out bench/results/transformer_dropout.json``
then the same without ``--dropout``.

A run of the same protocol already in ``--out`` is extended: its modes are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from heterofl_edge.assignment import parse_mode
from heterofl_edge.data import load_wikitext2
from heterofl_edge.models import get_architecture, register_architecture
from heterofl_edge.models.transformer import MaskedLanguageTransformer
from heterofl_edge.report import write_json
from heterofl_edge.sessions import session_threads
from heterofl_edge.simulation import Execution, RoundRecord, SimulationConfig, run_simulation
from heterofl_edge.tasks import LanguageModelTask, ScoredPositions
from heterofl_edge.training import LocalTrainingConfig

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "wikitext2"


def perplexity_all_positions(
    state: dict[str, torch.Tensor], mode: str, rows: torch.Tensor
) -> float:
    """The global model's perplexity scored at every position (the official code's metric)."""
    arch = get_architecture("transformer")
    rate = parse_mode(mode).global_rate
    model = arch.build(rate, rate)
    model.load_state_dict(state)
    task = LanguageModelTask(arch.num_classes, positions=ScoredPositions.all)
    with session_threads(1):
        return task.evaluate(model, rows, rows).perplexity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--modes", default="a,b,c,d,e", help="comma-separated modes, run in turn")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--fraction", type=float, default=0.2)
    parser.add_argument("--train-examples", type=int, default=2000, help="training rows kept")
    parser.add_argument("--test-examples", type=int, default=100, help="test rows kept")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--dropout", type=float, default=None, help="instead of the paper's 0.2")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "transformer.json"
    )
    args = parser.parse_args()
    data = load_wikitext2(args.data_dir)
    test_rows = data.test_x[: args.test_examples]
    settings: dict[str, Any] = {
        "rounds": args.rounds,
        "num_clients": args.clients,
        "fraction": args.fraction,
        "local": LocalTrainingConfig(epochs=1, batch_size=args.batch_size),
        "train_examples": args.train_examples,
        "test_examples": args.test_examples,
        "seed": 0,
    }
    runs: dict[str, Any] = {}
    if args.out.exists():  # extend an earlier run of the same protocol with other modes
        earlier = json.loads(args.out.read_text())
        if earlier.get("protocol") == results(args, {})["protocol"]:
            runs = earlier["runs"]
    model, suffix = "transformer", ""
    if args.dropout is not None:  # a copy of the built-in with another dropout, in this process
        model, suffix = f"transformer-dropout-{args.dropout:g}", f"-dropout-{args.dropout:g}"
        register_architecture(
            replace(
                get_architecture("transformer"),
                name=model,
                factory=lambda w, s: MaskedLanguageTransformer(w, s, dropout=args.dropout),
            )
        )
    for mode in args.modes.split(","):
        config = SimulationConfig(model=model, mode=mode, data="wikitext2", **settings)

        def report(record: RoundRecord, mode: str = mode) -> None:
            parts = ", ".join(f"{k} {v:.1f}" for k, v in record.seconds.items())
            perplexity = record.global_perplexity or float("inf")  # None: not finite
            print(
                f"{mode} round {record.round}: perplexity {perplexity:.1f}, "
                f"{record.round_seconds:.1f} s ({parts})",
                flush=True,
            )

        start = time.perf_counter()
        result = run_simulation(
            config, data, on_round=report, execution=Execution(workers=args.workers)
        )
        wall = time.perf_counter() - start
        rounds = result.rounds
        runs[mode + suffix] = {
            "initial_perplexity": result.initial_perplexity,
            "perplexity": [r.global_perplexity for r in rounds],
            "masked_token_accuracy": [r.global_accuracy for r in rounds],
            "train_loss": [r.train_loss for r in rounds],
            "levels": [r.levels for r in rounds],
            "round_seconds": [r.round_seconds for r in rounds],
            "seconds": [r.seconds for r in rounds],
            "train_rows_per_second": [r.samples_per_second for r in rounds],
            "final_perplexity_all_positions": perplexity_all_positions(
                result.global_state, mode, test_rows
            ),
            "wall_seconds": wall,
        }
        print(json.dumps({mode + suffix: runs[mode + suffix]["perplexity"]}), flush=True)
        write_json(args.out, results(args, runs))  # after every mode: a partial run survives


def results(args: argparse.Namespace, runs: dict[str, Any]) -> dict[str, Any]:
    return {
        "machine": {
            "cpu_count": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "protocol": (
            f"transformer, WikiText-2 (first {args.train_examples} training rows of 64 tokens, "
            f"first {args.test_examples} test rows), IID, {args.clients} clients, fraction "
            f"{args.fraction:g}, {args.rounds} rounds, E 1, B {args.batch_size}, SGD lr 0.1, "
            f"momentum 0.9, weight decay 5e-4, clip 1, masked LM 15%, workers {args.workers}"
        ),
        "runs": runs,
    }


if __name__ == "__main__":
    main()
