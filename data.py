"""Tasks, examples and token ids.

A task is a prompt (the paper's Table 6), a language and a metric. Its data lives on disk as
<data-dir>/<task>/{train,validation,test}.jsonl, one {"id", "document", "summary"[, "references"]}
per line. Training sees a seeded 50/50 train/validation subsample (Section 4.4), tokenized as
chat prompt (user turn) + summary (assistant turn), with the loss on the summary only.

    python data.py tasks                                   # the registry
    python data.py download xlsum-ja --data-dir data       # public sets, where the network exists
"""
import argparse
import json
import os
import random
import re
import socket
import sys
import tarfile
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlparse

import torch
from huggingface_hub import constants, hf_hub_download, list_repo_files

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Task:
    name: str
    language: str    # "en" or "ja": Japanese is segmented with MeCab before ROUGE/BLEU
    prompt: str      # the user turn; "{document}" marks where the input text goes
    metric: str      # "rougeL" for summaries, "bleu" for titles (paper, Section 4.1.3)
    max_source_tokens: int  # the document is cut to this; the instruction and cue never are
    max_target_tokens: int  # the summary is cut to this in training; generation length limit
    paper: bool = True      # True: prompt from Table 6 word for word; False: ours, in its style


# Table 6, word for word, quirks included ("three sentence"). The text extraction printed each
# prompt's answer cue at the start of the next row; here every cue is back on its own prompt
# (Bloomberg's was lost, "Summary:" as for the other news prompts). The authors' code was not
# available to us, so the separators are our choice: a newline between instruction, input and cue.
XLSUM = "Summarize the following Article in no more than three sentence.\nArticle: {document}\nSummary:"
WIKILINGUA = ("Summarize the following How-to Guide and write a one-sentence summary for each step:\n"
              "How-to Guide: {document}\nSummary:")
BLOOMBERG = "Summarize the following article in three sentences.\nArticle: {document}\nSummary:"
TITLE = ("Read the following Abstract of a scientific paper and create an appropriate title that reflects "
         "the content. Please only output the Japanese title.\nAbstract: {document}\nTitle:")
MIMIC = "Summarize the following radiology report.\nFindings: {document}\nImpression:"
SCITLDR = ("Write a TLDR by summarizing the following scientific paper in one sentence based on its Key "
           "Sections (Abstract, Introduction, and Conclusion).\nKey Sections: {document}\nTLDR:")

# Our own prompts, for the related tasks we have data for here (not in the paper).
DIALOGSUM = "Summarize the following Dialogue in no more than two sentences.\nDialogue: {document}\nSummary:"
AESLC = ("Read the following Email and create an appropriate subject line that reflects the content.\n"
         "Email: {document}\nSubject:")
LIVEDOOR = ("Read the following news Article and create an appropriate headline that reflects the content. "
            "Please only output the Japanese headline.\nArticle: {document}\nHeadline:")
XSCITLDR = ("Write a TLDR by summarizing the following Abstract of a scientific paper in one sentence. "
            "Please only output the Japanese TLDR.\nAbstract: {document}\nTLDR:")

TASKS = {t.name: t for t in [
    # the paper's tasks (Section 4.1); MIMIC-III, Bloomberg and the two paper sets are not public
    Task("xlsum-en", "en", XLSUM, "rougeL", 1024, 128),
    Task("xlsum-ja", "ja", XLSUM, "rougeL", 1024, 256),
    Task("wikilingua-en", "en", WIKILINGUA, "rougeL", 1024, 256),
    Task("wikilingua-ja", "ja", WIKILINGUA, "rougeL", 1024, 256),
    Task("scitldr", "en", SCITLDR, "rougeL", 2048, 64),  # AIC input is ~1.7k tokens; here abstract only
    Task("mimic-iii", "en", MIMIC, "rougeL", 512, 128),
    Task("bloomberg", "ja", BLOOMBERG, "rougeL", 1536, 256),
    Task("nlp-paper", "ja", TITLE, "bleu", 1024, 96),
    Task("medical-paper", "ja", TITLE, "bleu", 1024, 96),
    Task("nlp-paper-ja", "ja", TITLE, "bleu", 1024, 96),  # the NLP Paper task, data in ../shared/data
    # ours: related tasks with data here; titles/headlines/subjects get BLEU as the paper's titles do
    Task("dialogsum", "en", DIALOGSUM, "rougeL", 512, 128, paper=False),
    Task("aeslc", "en", AESLC, "bleu", 512, 48, paper=False),
    Task("livedoor-ja", "ja", LIVEDOOR, "bleu", 1024, 128, paper=False),
    Task("xscitldr-ja", "ja", XSCITLDR, "rougeL", 1024, 384, paper=False),
]}
# A handful of real examples each, to check formats: same prompt as their full task.
for _base in ["xlsum-en", "xlsum-ja", "wikilingua-en", "wikilingua-ja"]:
    TASKS[_base + "-sample"] = replace(TASKS[_base], name=_base + "-sample")
TASKS["scitldr-aic-sample"] = replace(TASKS["scitldr"], name="scitldr-aic-sample")


def get_task(name: str) -> Task:
    """The registered task, or an error that lists the known ones."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


# -----------------------------------------------------------------------------------------------
# examples on disk

def resolve_data_dir(path: str | Path | None = None) -> Path:
    """--data-dir if given, else $LORA_MERGE_DATA, else ./data."""
    return Path(path or os.environ.get("LORA_MERGE_DATA") or "data")


def atomic_write(path: Path, write):
    """write(file) into a temp file beside `path`, then rename: a kill never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict]:
    """One example per line; a broken line is reported by file and line number."""
    examples = []
    # split("\n"), not splitlines(): that also breaks at U+2028 etc., which JSON strings may hold
    for lineno, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            ex = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        missing = [k for k in ("document", "summary") if not isinstance(ex, dict) or k not in ex]
        if missing:
            raise ValueError(f"{path}:{lineno}: missing field(s) {missing}")
        ex.setdefault("id", f"{path.stem}-{lineno}")
        ex.setdefault("references", [ex["summary"]])  # SciTLDR and DialogSum test have several
        examples.append(ex)
    return examples


def load_split(task: str, split: str, data_dir: str | Path | None = None) -> list[dict]:
    """All examples of one split of a registered task."""
    get_task(task)
    folder = resolve_data_dir(data_dir) / task
    if not folder.is_dir():
        raise FileNotFoundError(f"no data for task {task!r}: folder {folder.resolve()} does not exist "
                                f"(set --data-dir or LORA_MERGE_DATA; `python data.py download {task}` "
                                f"fetches the public sets)")
    path = folder / f"{split}.jsonl"
    if not path.is_file():
        have = [s for s in SPLITS if (folder / f"{s}.jsonl").is_file()]
        raise FileNotFoundError(f"task {task!r} has no {split!r} split: {path.resolve()} does not exist "
                                f"(splits there: {', '.join(have) or 'none'})")
    return read_jsonl(path)


def subsample(examples: list, n: int, seed: int) -> list:
    """n examples drawn without replacement, the same ones for the same seed."""
    return random.Random(seed).sample(examples, min(n, len(examples)))


def low_resource_splits(task: str, n_train: int = 50, n_val: int = 50, seed: int = 0,
                        data_dir: str | Path | None = None) -> tuple[list[dict], list[dict]]:
    """The paper's low-resource setting: n_train from train and n_val from validation (Section 4.4)."""
    train = subsample(load_split(task, "train", data_dir), n_train, seed)
    val = subsample(load_split(task, "validation", data_dir), n_val, seed + 1)  # own stream per split
    return train, val


# -----------------------------------------------------------------------------------------------
# token ids. `tok` is model.Tokenizer or anything with encode/chat_prompt/end_of_turn_id.

SENTINEL = "@@DOCUMENT@@"  # stands in for the document while the chat template is rendered


def encode(tok, task: Task, document: str, summary: str | None = None,
           max_source_tokens: int | None = None, max_target_tokens: int | None = None) -> dict:
    """Chat prompt (+ summary + end of turn) as ids; labels are -100 except on the summary.

    Only the document is truncated: the chat prompt is rendered around a sentinel and encoded in
    three pieces, so the instruction and the answer cue always survive. The space before the
    document moves into the document piece, so that for an uncut document the ids equal those of
    the whole rendered prompt. With summary=None this is the generation prompt: training and
    inference see the same ids up to the assistant turn.
    """
    src_budget = max_source_tokens or task.max_source_tokens
    tgt_budget = max_target_tokens or task.max_target_tokens
    prefix, suffix = tok.chat_prompt(task.prompt.replace("{document}", SENTINEL)).split(SENTINEL)
    head = prefix.rstrip(" ")
    prompt = tok.encode(head) + tok.encode(prefix[len(head):] + document)[:src_budget] + tok.encode(suffix)
    if summary is None:
        return {"input_ids": prompt}
    target = tok.encode(summary)[:tgt_budget] + [tok.end_of_turn_id]
    return {"input_ids": prompt + target, "labels": [-100] * len(prompt) + target}


def collate(batch: list[dict], pad_id: int, side: str = "right") -> dict[str, torch.Tensor]:
    """Pad a list of encode() results to one batch. Padding gets label -100 and attention 0.
    Right padding for training; side="left" puts prompts flush against generated tokens."""
    width = max(len(b["input_ids"]) for b in batch)

    def pad(seq: list[int], value: int) -> list[int]:
        fill = [value] * (width - len(seq))
        return seq + fill if side == "right" else fill + seq

    out = {"input_ids": [pad(b["input_ids"], pad_id) for b in batch],
           "attention_mask": [pad([1] * len(b["input_ids"]), 0) for b in batch]}
    if "labels" in batch[0]:
        out["labels"] = [pad(b["labels"], -100) for b in batch]
    return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}  # each (B, T)


# -----------------------------------------------------------------------------------------------
# download (public sets only): task -> (Hub dataset, file or parquet config)

HUB = {
    "xlsum-en": ("csebuetnlp/xlsum", "english"),
    "xlsum-ja": ("csebuetnlp/xlsum", "japanese"),
    "wikilingua-en": ("GEM/wiki_lingua", "en"),  # GEM's train/validation/test split of WikiLingua
    "wikilingua-ja": ("GEM/wiki_lingua", "ja"),
    "scitldr": ("allenai/scitldr", "AIC"),  # the paper's input: abstract + introduction + conclusion
}


def check_hub_reachable(timeout: float = 5.0) -> None:
    """Fail in seconds, not after minutes of retries, when there is no way to the Hub."""
    if constants.HF_HUB_OFFLINE:
        raise RuntimeError("HF_HUB_OFFLINE is set, so nothing can be downloaded; put the files in "
                           "<data-dir>/<task>/{train,validation,test}.jsonl yourself")
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (80 if url.scheme == "http" else 443)), timeout).close()
    except OSError as e:
        raise RuntimeError(f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} ({e}); no network? "
                           f"Copy the files into <data-dir>/<task>/ by hand instead") from None


def hub_parquet_rows(repo: str, config: str, split: str) -> list[dict]:
    """Rows of one split from the Hub's parquet conversion (the loading scripts no longer run)."""
    try:
        import pyarrow.parquet as pq  # only the download needs it
    except ImportError:
        raise RuntimeError("reading the Hub's parquet files needs pyarrow: pip install pyarrow") from None
    files = [f for f in list_repo_files(repo, repo_type="dataset", revision="refs/convert/parquet")
             if re.fullmatch(rf"{config}/({split}/\d+|[^/]*-{split}(-\d+-of-\d+)?)\.parquet", f)]
    if not files:
        raise RuntimeError(f"{repo}: no parquet files for config {config!r} split {split!r}")
    rows = []
    for f in sorted(files):
        path = hf_hub_download(repo, f, repo_type="dataset", revision="refs/convert/parquet")
        rows += pq.read_table(path).to_pylist()
    return rows


def fetch(task: str, split: str) -> list[dict]:
    """One split of a public task, in our {id, document, summary, references} format."""
    repo, what = HUB[task]
    if repo == "csebuetnlp/xlsum":  # one tarball per language of {lang}_{train,val,test}.jsonl
        name = f"{what}_{'val' if split == 'validation' else split}.jsonl"
        with tarfile.open(hf_hub_download(repo, f"data/{what}_XLSum_v2.0.tar.bz2", repo_type="dataset")) as tar:
            member = next(m for m in tar.getmembers() if Path(m.name).name == name)
            rows = [json.loads(line) for line in tar.extractfile(member)]
        return [{"id": r["id"], "document": r["text"], "summary": r["summary"], "title": r["title"]} for r in rows]
    rows = hub_parquet_rows(repo, what, split)
    if repo == "allenai/scitldr":  # source = sentences, target = every TLDR of the paper
        return [{"id": r["paper_id"], "document": " ".join(r["source"]), "summary": r["target"][0],
                 "references": list(r["target"])} for r in rows]
    return [{"id": r["gem_id"], "document": r["source"], "summary": r["target"],
             "references": list(r.get("references") or [r["target"]])} for r in rows]


def download(task: str, data_dir: str | Path | None = None) -> Path:
    """Write <data-dir>/<task>/{train,validation,test}.jsonl from the Hugging Face Hub."""
    get_task(task)
    if task not in HUB:
        raise ValueError(f"{task!r} is not public; downloadable tasks: {', '.join(HUB)}")
    check_hub_reachable()
    folder = resolve_data_dir(data_dir) / task
    rows = {}
    for split in SPLITS:  # all splits first: a failure leaves no partial folder that looks like data
        try:
            rows[split] = fetch(task, split)
        except Exception as e:  # network, HTTP and format errors alike: say which file failed
            raise RuntimeError(f"downloading {task}/{split} from {HUB[task][0]} failed: {e!r}") from e
    for split, split_rows in rows.items():
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in split_rows)
        atomic_write(folder / f"{split}.jsonl", lambda f: f.write(text.encode("utf-8")))
        print(f"{task}/{split}: {len(split_rows)} examples")
    return folder


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["tasks", "download"])
    parser.add_argument("task", nargs="?")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    try:
        if args.command == "download":
            if not args.task:
                parser.error("download needs a TASK")
            print(download(args.task, args.data_dir))
        else:
            for t in TASKS.values():
                print(f"{t.name:22} {t.language} {t.metric:6} {t.max_source_tokens:5}/{t.max_target_tokens:<4} "
                      f"{'paper' if t.paper else 'ours '}  {t.prompt.splitlines()[0]}")
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
