"""Python pieces of the offline task definitions (referenced from the YAMLs as `!function taskfns.NAME`)."""
from __future__ import annotations

import re


def piqa_dataset(data_files: dict[str, str], labels_files: dict[str, str], **_):
    """PIQA as the authors ship it: questions in a jsonl file, the right solution's index (0/1) in a parallel
    .lst file, one line per item."""
    import datasets

    splits = {}
    for split, path in data_files.items():
        ds = datasets.load_dataset("json", data_files={split: path}, split=split)
        with open(labels_files[split], encoding="utf-8") as f:
            labels = [int(line) for line in f if line.strip()]
        if len(labels) != len(ds):
            raise ValueError(f"PIQA {split}: {len(ds)} items in {path} but {len(labels)} labels in {labels_files[split]}")
        splits[split] = ds.add_column("label", labels)
    return datasets.DatasetDict(splits)


def _clean_hellaswag(text: str) -> str:
    # WikiHow items carry bracketed section markers ("[title]", "[step]"); lm-eval's hellaswag task removes them.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_docs(dataset):
    """HellaSwag records -> query "<activity>: <ctx_a> <Ctx_b>" and four cleaned endings (lm-eval's prompt)."""

    def build(doc):
        context = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {"query": _clean_hellaswag(doc["activity_label"] + ": " + context),
                "choices": [_clean_hellaswag(e) for e in doc["endings"]],
                "label": int(doc["label"])}

    return dataset.map(build)


def boolq_text(doc) -> str:
    query = doc["query"]
    if query.startswith("Passage: "):
        query = query[len("Passage: "):]
    return query + "\nAnswer:"
