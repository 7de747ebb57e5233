"""data.py on the real data in ../shared/data: registry, loading, subsample, tokenization, download."""
import io
import json
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

import data  # noqa: E402


def readme_table() -> list[tuple[str, list[str]]]:
    """(folder, [train, val, test] counts as written) for every row of the data README's table."""
    rows = []
    for line in (DATA / "README.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 2 and re.fullmatch(r"[\d-]+ / [\d-]+ / [\d-]+", cells[-1]):
            rows.append((cells[0], cells[-1].split(" / ")))
    return rows


TABLE = readme_table()


def test_readme_table_covers_every_folder():
    assert len(TABLE) >= 11
    assert {f for f, _ in TABLE} == {p.name for p in DATA.iterdir() if p.is_dir()}


@pytest.mark.parametrize("folder,counts", TABLE, ids=[f for f, _ in TABLE])
def test_load_counts_match_readme(folder, counts):
    task = data.get_task(folder)  # every folder is a registered task
    for split, count in zip(data.SPLITS, counts):
        if count == "-":
            with pytest.raises(FileNotFoundError, match=f"no '{split}' split"):
                data.load_split(folder, split, DATA)
            continue
        examples = data.load_split(folder, split, DATA)
        assert len(examples) == int(count)
        assert len({ex["id"] for ex in examples}) == len(examples)
        for ex in examples:
            assert ex["document"].strip() and ex["summary"].strip()
            assert ex["references"] and ex["summary"] in ex["references"]
    assert task.language in ("en", "ja") and task.metric in ("rougeL", "bleu")


# -----------------------------------------------------------------------------------------------
# registry

TABLE6 = {  # the paper's Table 6 instructions, word for word
    "xlsum-en": "Summarize the following Article in no more than three sentence.",
    "wikilingua-en": "Summarize the following How-to Guide and write a one-sentence summary for each step:",
    "bloomberg": "Summarize the following article in three sentences.",
    "nlp-paper": "Read the following Abstract of a scientific paper and create an appropriate title that reflects "
                 "the content. Please only output the Japanese title.",
    "mimic-iii": "Summarize the following radiology report.",
    "scitldr": "Write a TLDR by summarizing the following scientific paper in one sentence based on its Key "
               "Sections (Abstract, Introduction, and Conclusion).",
}
CUES = {"xlsum-en": ("Article:", "Summary:"), "wikilingua-en": ("How-to Guide:", "Summary:"),
        "bloomberg": ("Article:", "Summary:"), "nlp-paper": ("Abstract:", "Title:"),
        "mimic-iii": ("Findings:", "Impression:"), "scitldr": ("Key Sections:", "TLDR:")}


def test_paper_tasks_have_table6_prompts_and_metrics():
    paper = ["xlsum-en", "xlsum-ja", "wikilingua-en", "wikilingua-ja", "scitldr", "mimic-iii", "bloomberg",
             "nlp-paper", "medical-paper"]
    for name in paper:
        assert data.get_task(name).paper
    for name, instruction in TABLE6.items():
        label, cue = CUES[name]
        assert data.get_task(name).prompt == f"{instruction}\n{label} {{document}}\n{cue}"
    assert data.TASKS["xlsum-ja"].prompt == data.TASKS["xlsum-en"].prompt
    assert data.TASKS["medical-paper"].prompt == data.TASKS["nlp-paper-ja"].prompt == data.TASKS["nlp-paper"].prompt
    metrics = {n: data.get_task(n).metric for n in ["mimic-iii", "scitldr", "bloomberg", "nlp-paper", "medical-paper"]}
    assert metrics == {"mimic-iii": "rougeL", "scitldr": "rougeL", "bloomberg": "rougeL",
                       "nlp-paper": "bleu", "medical-paper": "bleu"}
    langs = {n: data.get_task(n).language for n in paper}
    assert [n for n, lang in langs.items() if lang == "ja"] == ["xlsum-ja", "wikilingua-ja", "bloomberg",
                                                                "nlp-paper", "medical-paper"]


def test_our_tasks_are_marked_and_shaped_like_table6():
    ours = [t for t in data.TASKS.values() if not t.paper]
    assert {t.name for t in ours} == {"dialogsum", "aeslc", "livedoor-ja", "xscitldr-ja"}
    for t in data.TASKS.values():
        assert t.prompt.count("{document}") == 1 and re.search(r"\n\w[\w -]*: \{document\}\n\w+:$", t.prompt)
        assert 0 < t.max_target_tokens < t.max_source_tokens


def test_unknown_task_lists_known_tasks():
    with pytest.raises(ValueError, match="unknown task 'xlsum'.*known tasks: xlsum-en, xlsum-ja"):
        data.get_task("xlsum")
    with pytest.raises(ValueError, match="known tasks"):
        data.load_split("no-such-task", "train", DATA)


# -----------------------------------------------------------------------------------------------
# files and folders

def test_data_dir_order(monkeypatch, tmp_path):
    monkeypatch.delenv("LORA_MERGE_DATA", raising=False)
    assert data.resolve_data_dir() == Path("data")
    monkeypatch.setenv("LORA_MERGE_DATA", str(tmp_path))
    assert data.resolve_data_dir() == tmp_path
    assert data.resolve_data_dir(DATA) == DATA


def test_missing_folder_says_where_it_looked(monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_MERGE_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path.resolve() / "mimic-iii"))):
        data.load_split("mimic-iii", "train")


def test_missing_split_names_the_file_and_the_splits_there():
    with pytest.raises(FileNotFoundError, match=r"no 'test' split.*xscitldr-ja/test\.jsonl.*train, validation"):
        data.load_split("xscitldr-ja", "test", DATA)


def test_malformed_line_names_file_and_line(tmp_path):
    folder = tmp_path / "mimic-iii"  # a user's own data in the same layout
    folder.mkdir()
    good = '{"id": "a", "document": "findings", "summary": "impression"}\n'
    (folder / "train.jsonl").write_text(good + "\n" + good.replace('"a"', '"b"') + '{"id": "c", "document": \n')
    with pytest.raises(ValueError, match=r"mimic-iii/train\.jsonl:4: not valid JSON"):
        data.load_split("mimic-iii", "train", tmp_path)
    (folder / "train.jsonl").write_text(good + '{"id": "b", "document": "no summary"}\n')
    with pytest.raises(ValueError, match=r"train\.jsonl:2: missing field\(s\) \['summary'\]"):
        data.load_split("mimic-iii", "train", tmp_path)
    (folder / "train.jsonl").write_text(good)
    assert data.load_split("mimic-iii", "train", tmp_path) == [
        {"id": "a", "document": "findings", "summary": "impression", "references": ["impression"]}]


def test_subsample_is_seeded_and_reproducible():
    train_a, val_a = data.low_resource_splits("nlp-paper-ja", data_dir=DATA)
    train_b, val_b = data.low_resource_splits("nlp-paper-ja", data_dir=DATA)
    train_c, _ = data.low_resource_splits("nlp-paper-ja", seed=1, data_dir=DATA)
    ids = lambda exs: [ex["id"] for ex in exs]
    assert len(train_a) == len(val_a) == 50 and len(set(ids(train_a))) == 50
    assert ids(train_a) == ids(train_b) and ids(val_a) == ids(val_b)
    assert ids(train_a) != ids(train_c)
    all_val = {ex["id"] for ex in data.load_split("nlp-paper-ja", "validation", DATA)}
    assert set(ids(val_a)) <= all_val
    assert len(data.low_resource_splits("nlp-paper-ja", 500, 5, data_dir=DATA)[0]) == 298  # at most all


# -----------------------------------------------------------------------------------------------
# token ids (model.Tokenizer on the embedded SmolLM2 tokenizer)

@pytest.fixture(scope="module")
def tok():
    import model
    from embedded import embedded_model_dir
    return model.Tokenizer(embedded_model_dir())


def test_prompt_is_masked_and_summary_ends_the_turn(tok):
    task = data.get_task("nlp-paper-ja")
    ex = data.load_split("nlp-paper-ja", "validation", DATA)[0]
    train = data.encode(tok, task, ex["document"], ex["summary"])
    prompt = data.encode(tok, task, ex["document"])["input_ids"]
    n = len(prompt)
    assert train["input_ids"][:n] == prompt  # generation sees exactly the training prompt
    assert train["labels"][:n] == [-100] * n
    assert train["labels"][n:] == train["input_ids"][n:]
    assert train["labels"][-1] == tok.end_of_turn_id
    assert tok.decode(train["labels"][n:-1]) == ex["summary"]
    # uncut, the three-piece encoding is the encoding of the whole rendered chat prompt
    assert prompt == tok.encode(tok.chat_prompt(task.prompt.replace("{document}", ex["document"])))
    assert tok.decode(prompt).rstrip().endswith("Title:\nassistant")


def test_truncation_cuts_only_the_document(tok):
    task = data.get_task("xlsum-en-sample")
    ex = data.load_split("xlsum-en-sample", "test", DATA)[0]
    n_doc = len(tok.encode(" " + ex["document"]))
    full = data.encode(tok, task, ex["document"], ex["summary"], max_source_tokens=10_000)
    cut = data.encode(tok, task, ex["document"], ex["summary"], max_source_tokens=20, max_target_tokens=5)
    n_target = len(tok.encode(ex["summary"])) + 1
    assert n_doc > 20 and len(full["input_ids"]) - len(cut["input_ids"]) == (n_doc - 20) + (n_target - 6)
    text = tok.decode(cut["input_ids"])
    assert "Summarize the following Article in no more than three sentence.\nArticle:" in text
    assert "\nSummary:\nassistant\n" in text  # the cue and the assistant header survive
    head = len(tok.encode(tok.chat_prompt(task.prompt).split(" {document}")[0]))
    assert cut["input_ids"][:head + 20] == full["input_ids"][:head + 20]  # instruction + first 20 doc tokens
    assert cut["labels"].count(-100) == len(cut["labels"]) - 6  # 5 summary tokens + end of turn
    assert cut["labels"][-6:] == tok.encode(ex["summary"])[:5] + [tok.end_of_turn_id]


def test_collate_pads_outside_loss_and_attention(tok):
    task = data.get_task("aeslc")
    exs = data.load_split("aeslc", "validation", DATA)[:3]
    batch = [data.encode(tok, task, ex["document"], ex["summary"], max_source_tokens=64) for ex in exs]
    b = data.collate(batch, tok.pad_id)
    lengths = [len(x["input_ids"]) for x in batch]
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape == (3, max(lengths))
    for i, n in enumerate(lengths):
        assert b["input_ids"][i, :n].tolist() == batch[i]["input_ids"]
        assert b["attention_mask"][i].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert (b["labels"][i, n:] == -100).all() and (b["input_ids"][i, n:] == tok.pad_id).all()
    encoded = [data.encode(tok, task, ex["document"], max_source_tokens=64) for ex in exs]
    prompts = data.collate(encoded, tok.pad_id, side="left")
    assert "labels" not in prompts
    width = prompts["input_ids"].shape[1]
    for i, p in enumerate(encoded):  # left padding: every prompt ends at the last column
        n = len(p["input_ids"])
        assert prompts["input_ids"][i, width - n:].tolist() == p["input_ids"]
        assert prompts["attention_mask"][i].tolist() == [0] * (width - n) + [1] * n


# -----------------------------------------------------------------------------------------------
# download without a network: fast, clear, and never touching the network in this test

def no_hub(*args, **kwargs):
    raise AssertionError("the test must not reach the Hub")


def test_download_fails_fast_without_network(monkeypatch, tmp_path):
    def unreachable(address, timeout=None):
        assert timeout is not None and timeout <= 10
        raise OSError("[Errno 101] Network is unreachable")
    monkeypatch.setattr(data.socket, "create_connection", unreachable)
    monkeypatch.setattr(data, "hf_hub_download", no_hub)
    monkeypatch.setattr(data, "list_repo_files", no_hub)
    monkeypatch.setattr(data.constants, "HF_HUB_OFFLINE", False)
    start = time.time()
    with pytest.raises(RuntimeError, match="cannot reach the Hugging Face Hub.*Network is unreachable"):
        data.download("xlsum-ja", tmp_path)
    assert time.time() - start < 2 and not (tmp_path / "xlsum-ja").exists()


def test_download_respects_offline_mode_and_private_sets(monkeypatch, tmp_path):
    monkeypatch.setattr(data.socket, "create_connection", no_hub)
    monkeypatch.setattr(data.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE"):
        data.download("scitldr", tmp_path)
    with pytest.raises(ValueError, match="'mimic-iii' is not public"):
        data.download("mimic-iii", tmp_path)


def test_download_writes_the_layout_load_split_reads(monkeypatch, tmp_path):
    """The XLSum path end to end, with the Hub's tarball faked from our real XLSum (ja) sample."""
    archive = tmp_path / "japanese_XLSum_v2.0.tar.bz2"
    with tarfile.open(archive, "w:bz2") as tar:
        for split, name in [("train", "train"), ("validation", "val"), ("test", "test")]:
            rows = [{"id": ex["id"], "url": ex["url"], "title": ex["title"], "summary": ex["summary"],
                     "text": ex["document"]} for ex in data.load_split("xlsum-ja-sample", split, DATA)]
            raw = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
            info = tarfile.TarInfo(f"./japanese_{name}.jsonl")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    monkeypatch.setattr(data, "check_hub_reachable", lambda: None)
    monkeypatch.setattr(data, "hf_hub_download", lambda repo, filename, **kw: str(archive))
    real_fetch = data.fetch

    def cut_off(task, split):  # the connection drops at the last split
        if split == "test":
            raise ConnectionError("connection reset")
        return real_fetch(task, split)
    monkeypatch.setattr(data, "fetch", cut_off)
    with pytest.raises(RuntimeError, match="xlsum-ja/test"):
        data.download("xlsum-ja", tmp_path / "data")
    assert not (tmp_path / "data" / "xlsum-ja").exists()  # no partial folder that loads as a smaller data set
    monkeypatch.setattr(data, "fetch", real_fetch)
    data.download("xlsum-ja", tmp_path / "data")
    assert sorted(p.name for p in (tmp_path / "data" / "xlsum-ja").iterdir()) == [f"{s}.jsonl" for s in sorted(data.SPLITS)]
    for split in data.SPLITS:
        got = data.load_split("xlsum-ja", split, tmp_path / "data")
        want = data.load_split("xlsum-ja-sample", split, DATA)
        fields = lambda exs: [(ex["id"], ex["document"], ex["summary"]) for ex in exs]
        assert fields(got) == fields(want)


def test_download_command_line_offline(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, str(ROOT / "data.py"), "download", "wikilingua-ja", "--data-dir",
                        str(tmp_path)], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode != 0 and "error: HF_HUB_OFFLINE is set" in r.stderr
