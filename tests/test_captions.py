"""Several captions per sample (data/captions.py): each drawn as often as the next, the teacher's cached embedding of
the caption drawn equal to the live teacher's, and a resumed run equal to an uninterrupted one."""
import json

import numpy as np
import open_clip
import pytest
import torch
from conftest import resumed_equals_straight, write_shards
from scipy.stats import chisquare
from test_teacher_cache import CPU, FLOAT32_ROUNDING, assert_cached_equals_live, kd_config

from harness.data.captions import synthetic_captions
from harness.teachers import cache_key

SIZES = [40, 60]


def caption_config(tmp_path, teacher, embeddings: str, shards: str, **train_options):
    return kd_config(tmp_path / "runs", teacher, embeddings, augment=True, views=2,
                     data={"dataset": "webdataset", "path": shards, "num_samples": 96, "workers": 0,
                           "shuffle_window": 32, "captions": "sample"}, **{"batch_size": 32, **train_options})


def shard_captions(shards_folder) -> dict[int, list[str]]:
    """Every sample's captions by id (shard << 32 | position), read from the tars as written."""
    import tarfile

    found = {}
    for shard, path in enumerate(sorted(shards_folder.glob("*.tar"))):
        with tarfile.open(path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
        keys = sorted({name.split(".")[0] for name in members})
        for position, key in enumerate(keys):
            found[(shard << 32) | position] = [members[f"{key}.txt"].decode(),
                                               *synthetic_captions(members[f"{key}.syn.json"])]
    return found


def test_three_captions_are_drawn_alike_and_the_cache_reads_the_drawn_ones_embedding(tmp_path, teacher_checkpoint):
    """Over 40 steps (13 epochs of 96 samples), each of the 3 captions is drawn about a third of the time (a χ²
    test at the 0.1 % level); a sample's draw changes with the epoch; each step's caption is its draw; the cached
    teacher's text embedding of it equals the live teacher's (float64 run, float32 cache) and the first step's
    losses and gradients equal the live run's."""
    shards = write_shards(tmp_path / "shards", SIZES, synthetic=2)
    live, cached = assert_cached_equals_live(caption_config(tmp_path, teacher_checkpoint, "live", shards),
                                             caption_config(tmp_path, teacher_checkpoint, "cached", shards))
    captions, tokenizer = shard_captions(tmp_path / "shards"), open_clip.get_tokenizer("clipkd-tiny")
    assert {len(texts) for texts in captions.values()} == {3}
    counts, draws = np.zeros(3, dtype=int), {}
    with torch.no_grad():
        for step, (live_batch, cached_batch) in enumerate(zip(live.data.batches(0, 40), cached.data.batches(0, 40))):
            index = cached_batch.caption_index.numpy()
            assert torch.equal(live_batch.caption_index, cached_batch.caption_index)
            counts += np.bincount(index, minlength=3)
            for sample, i in zip(cached_batch.samples.tolist(), index):
                draws.setdefault(sample, set()).add(int(i))
            read = [captions[sample][i] for sample, i in zip(cached_batch.samples.tolist(), index)]
            assert torch.equal(cached_batch.texts, tokenizer(read)), step
            live_batch, cached_batch = live_batch.to(CPU, torch.float64), cached_batch.to(CPU, torch.float64)
            embedded, stored = live.teacher.members[0](live_batch)[1], cached.teacher.members[0](cached_batch)[1]
            torch.testing.assert_close(stored, embedded, rtol=2 * FLOAT32_ROUNDING, atol=1e-30, msg=f"step {step}")
    assert counts.sum() == 40 * 32 and chisquare(counts).pvalue > 1e-3, counts
    assert np.mean([len(seen) > 1 for seen in draws.values()]) > 0.9  # drawn again each epoch, not once per sample
    folder = cache_key.cache_dir(caption_config(tmp_path, teacher_checkpoint, "cached", shards))
    assert json.loads((folder / "meta.json").read_text())["captions"] == "all"
    assert np.load(folder / "shards" / "1.text.npy").shape == (60, 3, 96)


def test_a_resumed_caption_drawing_run_equals_an_uninterrupted_one(tmp_path, teacher_checkpoint, monkeypatch):
    """Captions drawn, views replayed from the cache, learnability selection: stopped by a signal after step 3,
    resumed, the weights equal those of a run never stopped, bit for bit."""
    shards = write_shards(tmp_path / "shards", SIZES, synthetic=2)
    options = {"steps": 6, "checkpoint_every": 2, "selection": {"method": "learnability", "ratio": 0.5},
               "batch_size": 16}
    resumed_equals_straight(caption_config(tmp_path, teacher_checkpoint, "cached", shards, **options).resolved(),
                            tmp_path, monkeypatch)


def test_several_captions_need_shards_and_a_cache_of_them_all(tmp_path, teacher_checkpoint):
    from harness.config.specs import ConfigError

    with pytest.raises(ConfigError, match="captions: 'sample' draws among a sample's several captions"):
        kd_config(tmp_path, teacher_checkpoint, "live", data={"captions": "sample"})
    assert synthetic_captions(json.dumps({"syn_text": ["a", " "], "syn_text_v2": "b", "other": ["c"]}).encode()) == ["a", "b"]
    assert synthetic_captions(b"not json") == [] and synthetic_captions(None) == []


def test_caption_command_writes_a_caption_list_per_sample_and_resumes_past_finished_shards(tmp_path, monkeypatch):
    """A tiny CoCa (random weights: its captions are noise; their number and format are what is checked) captions
    3 shards; interrupted in the second, the command run again skips the first (its file untouched), redoes the
    second and writes the third. Every output sample keeps its members and gains 2 captions, which a run reads
    after its own (data/captions.py)."""
    from conftest import run_clipkd

    from harness.data import caption
    from harness.data.shards import ShardIndex, ShardSource

    pattern = write_shards(tmp_path / "shards", [6, 5, 4])
    out = tmp_path / "captioned"
    sampling = caption.Sampling(captions=2, max_tokens=8, min_tokens=3)
    batches, real = [], caption._caption_batch

    def interrupted(batch, *args):
        batches.append(len(batch))
        if len(batches) == 3:  # shard 0 is two batches of 4 samples; the second shard's first batch is cut short
            raise KeyboardInterrupt
        return real(batch, *args)

    monkeypatch.setattr(caption, "_caption_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        caption.caption_shards(pattern, out, "clipkd-tiny-coca", None, sampling, batch_size=4)
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["shard-00.tar"]
    first = (out / "shard-00.tar").stat().st_mtime_ns
    resumed = run_clipkd("data", "caption", pattern, str(out), "--model", "clipkd-tiny-coca", "--captions", "2",
                         "--max-tokens", "8", "--batch-size", "4", "--device", "cpu", cwd=tmp_path)
    assert "1 of 3 shards already captioned" in resumed.stderr
    assert "9 samples captioned now (2 captions each)" in resumed.stdout
    assert "captioned shard-01.tar (5 samples), 1 of 2" in resumed.stderr  # its progress, a line a shard in a log
    assert (out / "shard-00.tar").stat().st_mtime_ns == first
    assert sorted(p.name for p in out.iterdir()) == ["shard-00.tar", "shard-01.tar", "shard-02.tar"]
    original, captioned = shard_members(tmp_path / "shards"), shard_members(out)
    assert original.keys() == captioned.keys() and len(captioned) == 15
    for key, members in captioned.items():
        assert {k: v for k, v in members.items() if k != "syn.json"} == original[key]
        texts = json.loads(members["syn.json"])["syn_text"]
        assert len(texts) == 2 and all(isinstance(t, str) and t.strip() for t in texts)
    source = ShardSource(ShardIndex(sorted(out.glob("*.tar")), tmp_path / "index"), *caption_source_parts())
    _, read = source.load(1 << 32)
    assert read[0] == original["00006"]["txt"].decode() and read[1:] == json.loads(captioned["00006"]["syn.json"])["syn_text"]
    again = run_clipkd("data", "caption", pattern, str(out), "--model", "clipkd-tiny-coca", cwd=tmp_path)
    assert "3 of 3 shards already captioned" in again.stderr
    refused = run_clipkd("data", "caption", pattern, str(tmp_path / "other"), "--model", "clipkd-tiny", check=False,
                         cwd=tmp_path)
    assert refused.returncode == 2 and "is a CLIP, which has no caption decoder; use a CoCa model" in refused.stderr
    assert "Traceback" not in refused.stderr


def shard_members(folder) -> dict[str, dict[str, bytes]]:
    import tarfile

    found = {}
    for path in sorted(folder.glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar:
                key, extension = member.name.split(".", 1)
                found.setdefault(key, {})[extension] = tar.extractfile(member).read()
    return found


def caption_source_parts():
    from harness.data.views import Augmentation, ViewSpec

    return ViewSpec.of("clipkd-tiny"), Augmentation("none"), open_clip.get_tokenizer("clipkd-tiny")
