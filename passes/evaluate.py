"""``python -m passes.evaluate REF.onnx CAND.onnx --data EVAL.npz``: judge a quantized model against FP.

Both models run in ONNX Runtime on the same inputs. Metrics by :class:`Task`:

- ``encoder`` (output ``[batch, seq, hidden]``): sentence embeddings are the attention-mask
  weighted mean of the token embeddings, L2-normalised; reported: cosine between REF and
  CAND embeddings (mean, min), and the Spearman correlation between the two models'
  pairwise sentence similarities (does CAND rank sentence pairs like REF?).
- ``causal-lm`` (output ``[batch, seq, vocab]`` logits): perplexity of each model on the
  next token, ``exp(mean -log p(x[t+1] | x[..t]))`` over positions whose target is not
  padding (``attention_mask``), and the top-1 agreement of the two models.
- always: per-output max |CAND - REF| / max |REF|.

``--latency`` times both models on one batch, alternating REF and CAND for each round so
machine noise hits both alike, and reports median times and their ratio. ``--disable-optimizer
NAME`` builds both sessions without that ORT graph transformer: ``SkipLayerNormFusion`` makes
BERT-like models faster on ORT 1.32's CPU provider (its fused kernel is slower than the Add and
LayerNormalization it replaces; ``python -m bench.skip_layer_norm``).

``--sqnr N`` lists the N linear ops (MatMul/Gemm/Conv outputs present in both graphs under the
same name, as the passes keep them, except outputs smoothing rescaled on purpose, which the
model's metadata lists) whose output SQNR ``10 log10(|Y_ref|² / |Y_cand - Y_ref|²)``
on the first sample is lowest: where the quantized model departs from FP. The errors
accumulate from layer to layer here, unlike ``--max-fp-layers``' per-layer measurement.

``auto`` picks ``causal-lm`` when the first output's last axis is larger than every token id
in the data (a vocabulary), else ``encoder`` for rank-3 outputs, else only the errors.
"""

from __future__ import annotations

import argparse
import enum
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from calibrators.data import CalibrationData, model_inputs
from calibrators.minmax import inference_session
from passes.ir.errors import SmoothQuantError
from passes.ir.graph import opset_version
from passes.ir.onnx_io import load_model
from passes.pipeline import RESCALED_OUTPUTS_KEY


class Task(enum.Enum):
    AUTO = "auto"
    ENCODER = "encoder"
    CAUSAL_LM = "causal-lm"
    GENERIC = "generic"


@dataclass
class Evaluation:
    task: Task
    samples: int
    metrics: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        width = max(len(k) for k in self.metrics) if self.metrics else 0
        return "\n".join([f"{self.task.value}: {self.samples} samples"]
                         + [f"  {k:<{width}}  {v:.6g}" for k, v in self.metrics.items()])


def pooled_embeddings(tokens: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Mask-weighted mean over the sequence, L2-normalised: ``[batch, hidden]``."""
    tokens = tokens.astype(np.float64)
    weights = np.ones(tokens.shape[:2]) if mask is None else mask.astype(np.float64)
    pooled = (tokens * weights[..., None]).sum(1) / np.maximum(weights.sum(1, keepdims=True), 1e-9)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two 1-D arrays (ties broken by position)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def next_token_nll(logits: np.ndarray, ids: np.ndarray, mask: np.ndarray | None) -> tuple[float, int]:
    """Sum of -log p(next token) over positions whose target is real, and their count."""
    target = ids[:, 1:]
    valid = np.ones(target.shape, bool) if mask is None else mask[:, 1:].astype(bool)
    total = 0.0
    for row in range(len(logits)):  # one sample at a time: a 262k vocabulary makes a batch's float64 copy huge
        lg = logits[row, :-1].astype(np.float64)
        top = lg.max(-1, keepdims=True)
        log_z = np.log(np.exp(lg - top).sum(-1)) + top[..., 0]
        picked = np.take_along_axis(lg, target[row][..., None], -1)[..., 0]
        total += float(((log_z - picked) * valid[row]).sum())
    return total, int(valid.sum())


def _pick_task(task: Task, output: np.ndarray, feed: dict[str, np.ndarray]) -> Task:
    if task is not Task.AUTO:
        return task
    ids = feed.get("input_ids")
    if output.ndim == 3 and ids is not None and output.shape[-1] > int(ids.max()):
        return Task.CAUSAL_LM
    return Task.ENCODER if output.ndim == 3 else Task.GENERIC


def evaluate(reference: str | os.PathLike, candidate: str | os.PathLike, data: str | os.PathLike, *,
             task: Task = Task.AUTO, batch_size: int = 16, latency_rounds: int = 0,
             disabled_optimizers: Sequence[str] = ()) -> Evaluation:
    """Compare ``candidate`` with ``reference`` on ``data`` (an .npz or folder of them).
    ``disabled_optimizers``: ORT graph transformers both sessions run without (e.g.
    ``SkipLayerNormFusion``, whose kernel is slower than what it replaces in ORT 1.32 on CPU)."""
    ref_model, cand_model = load_model(reference), load_model(candidate)
    if opset_version(cand_model.proto) >= 21 and "MatMulAddFusion" not in disabled_optimizers:
        # ONNX Runtime 1.32 (CPU) breaks DQ -> MatMul -> Add of static 3-D shapes at opset >= 21
        # ("gemm_input_reshape_arg_q ... output_dtype INT8 does not match y_zero_point type UINT8")
        disabled_optimizers = (*disabled_optimizers, "MatMulAddFusion")
    ref = inference_session(ref_model.proto, ref_model.base_dir, disabled_optimizers=disabled_optimizers)
    cand = inference_session(cand_model.proto, cand_model.base_dir, disabled_optimizers=disabled_optimizers)
    ref_inputs = {i.name for i in ref.get_inputs()}
    if ref_inputs != {i.name for i in cand.get_inputs()}:
        raise SmoothQuantError(f"{candidate}: inputs {sorted(i.name for i in cand.get_inputs())} differ from "
                               f"{reference}'s {sorted(ref_inputs)}")
    loader = CalibrationData(data, batch_size)
    loader.check(model_inputs(ref_model.proto))  # names, dtypes, shapes: one line before any run
    err_num: dict[str, float] = {}
    err_den: dict[str, float] = {}
    emb_ref, emb_cand = [], []
    nll_ref = nll_cand = 0.0
    tokens = agree = positions = samples = 0
    picked = task
    first_feed = None
    for feed in loader.batches():
        feed = {k: v for k, v in feed.items() if k in ref_inputs}
        first_feed = first_feed or feed
        outs_ref, outs_cand = ref.run(None, feed), cand.run(None, feed)
        for meta, r, c in zip(ref.get_outputs(), outs_ref, outs_cand):
            diff = max((float(np.abs(c[i].astype(np.float64) - r[i]).max()) for i in range(len(r))), default=0.0) \
                if r.size and r.ndim else (float(np.abs(np.float64(c) - r)) if r.size else 0.0)
            err_num[meta.name] = max(err_num.get(meta.name, 0.0), diff)
            err_den[meta.name] = max(err_den.get(meta.name, 0.0), float(np.abs(r).max()) if r.size else 0.0)
        picked = _pick_task(picked, outs_ref[0], feed)
        mask = feed.get("attention_mask")
        if picked is Task.ENCODER:
            emb_ref.append(pooled_embeddings(outs_ref[0], mask))
            emb_cand.append(pooled_embeddings(outs_cand[0], mask))
        elif picked is Task.CAUSAL_LM:
            ids = feed["input_ids"]
            a, n = next_token_nll(outs_ref[0], ids, mask)
            b, _ = next_token_nll(outs_cand[0], ids, mask)
            nll_ref, nll_cand, tokens = nll_ref + a, nll_cand + b, tokens + n
            valid = np.ones(ids.shape, bool) if mask is None else mask.astype(bool)
            agree += int(((outs_ref[0].argmax(-1) == outs_cand[0].argmax(-1)) & valid).sum())
            positions += int(valid.sum())
        samples += len(next(iter(feed.values())))
    if samples == 0:
        raise SmoothQuantError(f"{data}: no samples")
    result = Evaluation(picked, samples)
    if picked is Task.ENCODER:
        a, b = np.concatenate(emb_ref), np.concatenate(emb_cand)
        cos = (a * b).sum(1)
        iu = np.triu_indices(len(a), 1)
        result.metrics.update({"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
                               "similarity_spearman": spearman((a @ a.T)[iu], (b @ b.T)[iu])})
    elif picked is Task.CAUSAL_LM:
        ppl_ref, ppl_cand = float(np.exp(nll_ref / tokens)), float(np.exp(nll_cand / tokens))
        result.metrics.update({"perplexity_ref": ppl_ref, "perplexity_cand": ppl_cand,
                               "perplexity_increase_pct": 100 * (ppl_cand / ppl_ref - 1),
                               "top1_agreement": agree / max(positions, 1)})
    for name in err_num:
        result.metrics[f"max_rel_err[{name}]"] = err_num[name] / err_den[name] if err_den[name] else err_num[name]
    if latency_rounds > 0:
        t_ref, t_cand = time_alternating(ref, cand, first_feed, latency_rounds)
        result.metrics.update({"latency_ref_ms": 1e3 * t_ref, "latency_cand_ms": 1e3 * t_cand,
                               "speedup": t_ref / t_cand})
    return result


def layer_sqnr(reference: str | os.PathLike, candidate: str | os.PathLike,
               feed: dict[str, np.ndarray]) -> list[tuple[str, float]]:
    """(linear-op output, SQNR dB) for every MatMul/Gemm/Conv output both graphs share, lowest first."""
    ref_model, cand_model = load_model(reference), load_model(candidate)
    produced = {o for n in cand_model.proto.graph.node for o in n.output}
    meta = {p.key: p.value for p in cand_model.proto.metadata_props}
    rescaled = set(json.loads(meta.get(RESCALED_OUTPUTS_KEY, "[]")))  # divided by s on purpose: not comparable
    names = [n.output[0] for n in ref_model.proto.graph.node
             if n.op_type in ("MatMul", "Gemm", "Conv") and n.output[0] in produced and n.output[0] not in rescaled]
    values = []
    for loaded in (ref_model, cand_model):
        proto = onnx.ModelProto()
        proto.CopyFrom(loaded.proto)
        existing = {o.name for o in proto.graph.output}
        proto.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in existing)
        values.append(inference_session(proto, loaded.base_dir).run(names, feed))
    out = []
    for name, r, c in zip(names, *values):
        err = float(((c.astype(np.float64) - r) ** 2).sum())
        out.append((name, float("inf") if err == 0 else float(10 * np.log10(float((r.astype(np.float64) ** 2).sum()) / err))))
    return sorted(out, key=lambda item: item[1])


def time_alternating(ref, cand, feed: dict[str, np.ndarray], rounds: int, warmup: int = 3) -> tuple[float, float]:
    """Median seconds per run of each session, REF and CAND run in turn every round."""
    for _ in range(warmup):
        ref.run(None, feed)
        cand.run(None, feed)
    times = np.zeros((rounds, 2))
    for i in range(rounds):
        for j, session in enumerate((ref, cand)):
            start = time.perf_counter()
            session.run(None, feed)
            times[i, j] = time.perf_counter() - start
    return float(np.median(times[:, 0])), float(np.median(times[:, 1]))


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m passes.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("reference", help="the FP model")
    p.add_argument("candidate", help="the quantized model")
    p.add_argument("--data", required=True, help="evaluation inputs: .npz (keys = input names) or a folder")
    p.add_argument("--task", choices=[t.value for t in Task], default=Task.AUTO.value)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--latency", type=int, default=0, metavar="ROUNDS",
                   help="also time both models on the first batch, alternating, ROUNDS rounds")
    p.add_argument("--disable-optimizer", action="append", default=[], metavar="NAME",
                   help="run both sessions without this ONNX Runtime graph transformer, e.g. SkipLayerNormFusion "
                        "(repeatable; ORT ignores names it does not know)")
    p.add_argument("--sqnr", type=int, default=0, metavar="N",
                   help="also list the N linear-op outputs with the lowest SQNR on the first sample")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    try:
        result = evaluate(args.reference, args.candidate, args.data, task=Task(args.task),
                          batch_size=args.batch_size, latency_rounds=args.latency,
                          disabled_optimizers=tuple(args.disable_optimizer))
    except SmoothQuantError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(result.summary())
    if args.sqnr:
        first = {k: v[:1] for k, v in next(iter(CalibrationData(args.data, 1).batches())).items()}
        try:
            rows = layer_sqnr(args.reference, args.candidate, first)
        except SmoothQuantError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"lowest output SQNR of {len(rows)} linear ops (first sample):")
        for name, db in rows[:args.sqnr]:
            print(f"  {db:7.2f} dB  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
