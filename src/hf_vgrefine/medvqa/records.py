"""Prediction records on disk: ``predictions.jsonl`` (merged) and ``predictions.rank{r}.jsonl`` (one append-only
shard per process, flushed and fsynced per batch), de-duplication on (method, id), merging, re-scoring."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from ..atomic import atomic_write
from .schema import CLOSED, MedVQAItem
from .scorers import score_open

__all__ = ["PREDICTIONS", "ShardWriter", "make_record", "merge_shards", "prediction_files", "read_jsonl",
           "read_records", "rescore"]

PREDICTIONS = "predictions.jsonl"


def read_jsonl(path: Path) -> list[dict]:
    """Prediction records of one JSONL file (lines cut by a crash and non-records are skipped)."""
    out = []
    if not path.exists():
        return out
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a crash
                continue
            if isinstance(rec, dict) and "method" in rec and "id" in rec:
                out.append(rec)
    return out


def prediction_files(out_dir: Path) -> list[Path]:
    """The merged predictions file and every per-process shard of ``out_dir``."""
    return [out_dir / PREDICTIONS, *sorted(out_dir.glob("predictions.rank*.jsonl"))]


def read_records(out_dir: str | os.PathLike) -> list[dict]:
    """All records in ``out_dir`` (merged file and shards), de-duplicated on (method, id): a record
    without ``error`` beats one with; otherwise the later one wins."""
    best: dict[tuple[str, str], dict] = {}
    for p in prediction_files(Path(out_dir)):
        for r in read_jsonl(p):
            k = (r["method"], r["id"])
            old = best.get(k)
            if old is None or r.get("error") is None or old.get("error") is not None:
                best[k] = r  # a good record (or a newer error over an error) replaces the old one
    return list(best.values())


class ShardWriter:
    """Append-only JSONL writer; every :meth:`write` is flushed and fsynced."""

    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "a+b")  # noqa: SIM115 - kept open across batches, closed by close()
        self.f.seek(0, os.SEEK_END)
        if self.f.tell() > 0:  # a crash may have left a partial last line: start on a fresh one
            self.f.seek(-1, os.SEEK_END)
            if self.f.read(1) != b"\n":
                self.f.write(b"\n")
        self.f.seek(0, os.SEEK_END)

    def write(self, records: Sequence[dict]) -> None:
        if not records:
            return
        self.f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8"))
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


def merge_shards(out_dir: str | os.PathLike, order: Sequence[tuple[str, str]] = (),
                 transform: Callable[[list[dict]], list[dict]] | None = None) -> list[dict]:
    """Merge shards into ``predictions.jsonl`` (atomic replace), then delete the shards.

    ``order``: (method, id) keys giving the output order; other records follow in read order.
    ``transform``: applied to the de-duplicated records before writing (e.g. re-scoring).
    """
    out = Path(out_dir)
    recs = read_records(out)
    if transform is not None:
        recs = transform(recs)
    rank = {k: i for i, k in enumerate(order)}
    recs.sort(key=lambda r: rank.get((r["method"], r["id"]), len(rank)))
    atomic_write(out / PREDICTIONS, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), fsync=True)
    for p in out.glob("predictions.rank*.jsonl"):
        p.unlink()
    return recs


def rescore(rec: dict, item: MedVQAItem | None, score_closed, scorer: str) -> dict:
    """Score a stored response again with the current scorer (records of other items: unchanged)."""
    if item is None or rec.get("error") is not None or rec.get("response") is None:
        return rec
    rec = dict(rec)
    if item.answer_type == CLOSED:
        s = score_closed(rec["response"], item)
        rec.update(extracted=s.extracted, step=s.step, target=s.target, correct=bool(s.correct), scorer=scorer)
    else:
        s = score_open(rec["response"], item)
        rec.update(exact=s.exact, recall=s.recall, scorer="exact_match+token_recall")
    return rec


def make_record(method: str, it: MedVQAItem, prompt: str, response: str | None, *, extracted=None, step=None,
                target=None, correct=None, exact=None, recall=None, error=None) -> dict:
    """One prediction record (a JSONL line)."""
    return {"method": method, "id": it.id, "dataset": it.dataset, "subset": it.subset, "answer_type": it.answer_type,
            "prompt": prompt, "response": response, "extracted": extracted, "step": step, "target": target,
            "answer": it.answer, "correct": correct, "exact": exact, "recall": recall, "error": error}
