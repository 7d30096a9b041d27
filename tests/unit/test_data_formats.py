"""Datasets in Hugging Face `datasets` formats (Parquet, JSON, Arrow, `save_to_disk` directories) read like JSONL,
with the same checks and errors naming `file, row N`; the tokenised set lives in a memory-mapped store whose
samples equal the eager ones. Fixtures are written with the real `datasets` library."""

from __future__ import annotations

import json
import sys

import datasets
import pytest
from datasets import Dataset, DatasetDict

from polytrain.data import records as records_module
from polytrain.data import store as store_module
from polytrain.data.chat import get_template, render
from polytrain.data.dataset import load_sft_dataset, make_sample
from polytrain.data.jsonl import load_conversations
from polytrain.data.preference import load_preference_pairs
from polytrain.data.prompts import load_prompts
from polytrain.data.records import read_records
from polytrain.errors import DataError

datasets.disable_progress_bars()

CONVERSATIONS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Yo"}],
    [{"role": "user", "content": "2 + 3?"}, {"role": "assistant", "content": "5"},
     {"role": "user", "content": "[and, then]"}, {"role": "assistant", "content": "{\"done\": true}"}],
    [{"role": "user", "content": "x" * 40}, {"role": "assistant", "content": "long"}],
    [{"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao"}],
]
RECORDS = [{"messages": c} for c in CONVERSATIONS]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def as_parquet(tmp_path, records):
    Dataset.from_list(records).to_parquet(tmp_path / "data.parquet")
    return tmp_path / "data.parquet"


def as_json_lines(tmp_path, records):
    Dataset.from_list(records).to_json(tmp_path / "data.json")
    return tmp_path / "data.json"


def as_json_array(tmp_path, records):
    Dataset.from_list(records).to_json(tmp_path / "data.json", lines=False)
    return tmp_path / "data.json"


def as_saved(tmp_path, records):
    Dataset.from_list(records).save_to_disk(tmp_path / "saved", num_shards=2)
    return tmp_path / "saved"


def as_split(tmp_path, records):
    DatasetDict({"train": Dataset.from_list(records), "test": Dataset.from_list(records[:1])}).save_to_disk(
        tmp_path / "dd")
    return tmp_path / "dd" / "train"


def as_parquet_directory(tmp_path, records):
    folder = tmp_path / "shards"
    folder.mkdir()
    half = len(records) // 2
    Dataset.from_list(records[:half]).to_parquet(folder / "train-00000.parquet")
    Dataset.from_list(records[half:]).to_parquet(folder / "train-00001.parquet")
    (folder / "README.md").write_text("not data")
    return folder


def as_arrow_file(tmp_path, records):
    import pyarrow as pa

    table = Dataset.from_list(records).data.table
    with pa.ipc.new_file(str(tmp_path / "data.arrow"), table.schema) as writer:
        writer.write_table(table, max_chunksize=3)
    return tmp_path / "data.arrow"


WRITERS = [as_parquet, as_json_lines, as_json_array, as_saved, as_split, as_parquet_directory, as_arrow_file]


@pytest.mark.parametrize("writer", WRITERS, ids=lambda w: w.__name__)
def test_every_format_loads_the_conversations_of_the_jsonl(tmp_path, writer):
    expected = load_conversations(write_jsonl(tmp_path / "data.jsonl", RECORDS))
    assert load_conversations(writer(tmp_path, RECORDS)) == expected == CONVERSATIONS


def test_a_bad_parquet_record_names_file_and_row(tmp_path):
    bad = [*RECORDS[:2], {"messages": [{"role": "user", "content": "no reply"}]},
           {"messages": [{"role": "asistant", "content": "x"}]}]
    with pytest.raises(DataError) as err:
        load_conversations(as_parquet(tmp_path, bad))
    assert str(err.value) == (f"{tmp_path / 'data.parquet'}, row 2: conversation has no assistant turn, so there is "
                              "nothing to train on")
    with pytest.raises(DataError, match=r"row 2: messages\[0\].role is 'asistant' \(did you mean `assistant`\?\)"):
        load_conversations(as_parquet(tmp_path, [*RECORDS[:2], bad[3]]))
    with pytest.raises(DataError, match=r"shards/train-00001.parquet, row 1: conversation has no assistant turn"):
        load_conversations(as_parquet_directory(tmp_path, [*RECORDS[:2], bad[2]]))
    with pytest.raises(DataError, match=r"data.parquet, row 0: expected an object with a `messages` list \(found "
                                         r"keys: text\)"):
        load_conversations(as_parquet(tmp_path, [{"text": "plain"}]))


def test_a_dataset_dict_needs_its_split_named(tmp_path):
    folder = as_split(tmp_path, RECORDS).parent
    with pytest.raises(DataError) as err:
        load_conversations(folder)
    assert str(err.value) == f"{folder}: a DatasetDict with splits train, test: name one, e.g. {folder / 'train'}"
    with pytest.raises(DataError, match=r"dd/validation: the DatasetDict .*dd has no split `validation` \(splits: "
                                        r"train, test\)"):
        load_conversations(folder / "validation")
    assert load_conversations(folder / "test") == CONVERSATIONS[:1]


def test_directories_hold_one_kind_of_data_file(tmp_path):
    folder = as_parquet_directory(tmp_path, RECORDS)
    write_jsonl(folder / "extra.jsonl", RECORDS)
    with pytest.raises(DataError, match=r"shards: the directory mixes json and parquet files \(extra.jsonl, "
                                        r"train-00000.parquet\); keep one kind"):
        load_conversations(folder)
    (tmp_path / "empty" / "data").mkdir(parents=True)
    with pytest.raises(DataError, match=r"empty: no .parquet, .arrow, .json or .jsonl files in the directory \(it "
                                        r"holds the directories data: name one\)"):
        load_conversations(tmp_path / "empty")
    with pytest.raises(DataError, match=r"dataset is empty \(no records\)"):
        load_conversations(_empty_parquet(tmp_path))


def _empty_parquet(tmp_path):
    Dataset.from_dict({"messages": []}).to_parquet(tmp_path / "empty.parquet")
    return tmp_path / "empty.parquet"


def test_without_pyarrow_columnar_files_ask_for_the_extra_and_jsonl_still_reads(tmp_path, monkeypatch):
    path = as_parquet(tmp_path, RECORDS)
    jsonl = write_jsonl(tmp_path / "data.jsonl", RECORDS)
    for name in [m for m in sys.modules if m == "pyarrow" or m.startswith("pyarrow.")]:
        monkeypatch.setitem(sys.modules, name, None)  # `import pyarrow` now raises ImportError
    with pytest.raises(DataError) as err:
        load_conversations(path)
    assert str(err.value) == f"{path}: reading .parquet files needs pyarrow: pip install 'polytrain[data]'"
    assert load_conversations(jsonl) == CONVERSATIONS


def test_json_arrays_stream_through_a_small_buffer(tmp_path, monkeypatch):
    monkeypatch.setattr(records_module, "CHUNK", 5)
    items = [*RECORDS, {"messages": [{"role": "user", "content": "n"}, {"role": "assistant", "content": "1"}],
                        "score": 12345678901234567890, "tags": ["a]", "b,"]}]
    path = tmp_path / "pretty.json"
    path.write_text(json.dumps(items, indent=2))
    assert [record for _, record in read_records(path)] == items
    assert [where for where, _ in read_records(path)][-1] == f"{path}, record 4"
    path.write_text("[ ]")
    assert list(read_records(path)) == []
    path.write_text('[{"messages": []} {"messages": []}]')
    with pytest.raises(DataError, match=r"pretty.json, record 1: invalid JSON \(expected ',' or ']' after a record"):
        list(read_records(path))
    path.write_text('[{"messages": []}, {"messages": [}]')
    with pytest.raises(DataError, match=r"pretty.json, record 1: invalid JSON \(Expecting value\)"):
        list(read_records(path))


def test_the_token_store_gives_the_samples_of_the_eager_path(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(store_module, "FLUSH_TOKENS", 7)  # many small appends to the files
    template = get_template("polytrain", tokenizer)
    too_long = {"messages": [{"role": "user", "content": "y" * 30}, {"role": "assistant", "content": "z"}]}
    path = write_jsonl(tmp_path / "data.jsonl", [*RECORDS, too_long] * 3)
    dataset = load_sft_dataset(str(path), tokenizer, template, 24, "assistant", 128)
    eager = [make_sample(*render(c, template, tokenizer), 24) for c in load_conversations(path)]
    eager = [s for s in eager if s is not None]
    assert 0 < len(eager) == len(dataset.samples) < 15 and dataset.dropped == 15 - len(eager)
    for built, expected in zip(dataset.samples, eager):
        assert built.input_ids.dtype == built.labels.dtype == expected.input_ids.dtype
        assert built.input_ids.tolist() == expected.input_ids.tolist()
        assert built.labels.tolist() == expected.labels.tolist()
    assert dataset.num_tokens == sum(len(s) for s in eager)
    assert [s.labels.tolist() for s in dataset.samples[1:3]] == [s.labels.tolist() for s in eager[1:3]]
    assert dataset.samples[-1].input_ids.tolist() == eager[-1].input_ids.tolist()
    with pytest.raises(IndexError):
        dataset.samples[len(eager)]


def test_preference_pairs_read_from_parquet_match_the_jsonl(tmp_path, tokenizer):
    template = get_template("polytrain", tokenizer)
    # `Dataset.from_list` takes its columns from the first record: a null there is a missing value
    pairs = [{"prompt": "Reverse: ab", "chosen": "ba", "rejected": "ab", "margin": 1.5, "ref_chosen_logp": None,
              "ref_rejected_logp": None},
             {"prompt": "Reverse: " + "x" * 100, "chosen": "x", "rejected": "y", "margin": 0.0},
             {"prompt": "Say hi", "chosen": "hi", "rejected": "no", "ref_chosen_logp": -1.0, "ref_rejected_logp": -2.0}]
    from_jsonl, dropped_jsonl = load_preference_pairs(write_jsonl(tmp_path / "p.jsonl", pairs), tokenizer,
                                                      template, 32, 1000)
    from_parquet, dropped = load_preference_pairs(as_parquet(tmp_path, pairs), tokenizer, template, 32, 1000)
    assert (len(from_parquet), dropped) == (len(from_jsonl), dropped_jsonl) == (2, 1)
    for a, b in zip(from_parquet, from_jsonl):
        assert a.chosen.labels.tolist() == b.chosen.labels.tolist()
        assert a.rejected.input_ids.tolist() == b.rejected.input_ids.tolist()
        assert (a.ref_chosen, a.ref_rejected, a.margin) == (b.ref_chosen, b.ref_rejected, b.margin)
    assert (from_parquet[0].ref_chosen, from_parquet[1].ref_rejected) == (None, -2.0)
    assert from_parquet.missing_reference() == [0]
    assert [r["prompt"] for r in from_parquet.records()] == ["Reverse: ab", "Say hi"]  # the dropped pair skipped
    with pytest.raises(DataError, match=r"data.parquet, row 0: chosen: expected a string or a list of messages"):
        load_preference_pairs(as_parquet(tmp_path, [{"prompt": "a", "chosen": 3, "rejected": 4}]), tokenizer,
                              template, 32, 1000)


def test_prompt_datasets_accept_the_new_formats(tmp_path, tokenizer):
    template = get_template("polytrain", tokenizer)
    prompts = [{"prompt": "What is 2 + 3?", "answer": "5"}, {"prompt": "Name a colour"}]
    expected, _ = load_prompts(write_jsonl(tmp_path / "p.jsonl", prompts), tokenizer, template, 40)
    for writer in (as_parquet, as_saved):
        items, dropped = load_prompts(writer(tmp_path, prompts), tokenizer, template, 40)
        assert dropped == 0 and list(items) == list(expected)
    assert expected[1].answer is None
