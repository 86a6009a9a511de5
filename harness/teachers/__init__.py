"""Teachers: built live (``live``), read from their embedding cache (``cached``), several as an ensemble
(``ensemble``). The teacher-embedding cache: its key (``cache_key``), its build (``cache_build``) and the
builders' locking (``cache_lock``).

The teacher-embedding cache: a frozen teacher's embeddings of a training set, computed once and shared.

Every CLIP-KD loss needs only the teacher's final (normalised) embeddings, so runs that distil the same teacher on
the same data read them with each sample instead of running the teacher on every step. As in MobileCLIP's dataset
reinforcement (Vasu et al. 2024), a cache can hold K augmented views per sample (``teacher.views: K``): each view's
crop box and the teacher's image embedding of exactly that view. A run then trains on one stored view per sample
and epoch, its student's image rebuilt from the same box (``data/views.py``), so cached and live distillation are
the same experiment. ``views: 0`` stores the un-augmented view alone.

Layout of ``<output_dir>/.teacher-embeddings/<key>/`` (``clipkd cache info`` summarises one):

- ``meta.json``, written last: the spec the key hashes (teacher, data, views, preprocessing, storage dtype), the
  sample count, the embedding size and the teacher's logit scale;
- map-style sets (built-in, CSV): per building rank r, ``parts/r.image.npy`` (n_r × max(K, 1) × D),
  ``parts/r.text.npy`` (n_r × D, a caption once), ``parts/r.boxes.npy`` (n_r × K × 4: top, left, height, width),
  rank r's contiguous range of samples from ``meta["parts"][r]`` on: each rank writes files of its own, so no
  page of one file is written back by two nodes (on NFS a node's write-back of a shared page can overwrite a
  neighbour's rows). Caches built before that hold ``image.npy``, ``text.npy`` and ``boxes.npy`` by sample index;
- webdataset: the same three arrays per shard under ``shards/``, rows by position in the shard, and per shard its
  path, sample count and a digest of its ``__key__``s in ``meta.json``.

Loader workers read the rows of the samples they yield (``CachedRows``); the trainer never builds the teacher.
A build is one pass over the data: under torchrun every rank embeds its share at once (shards: whole shards per
rank and loader worker), in the run's precision. Builders queue on an exclusive lock, write a private folder and
rename it into place, so a cache folder is whole whenever it exists; a builder removes the partial folders whose
builders are gone. No rank waits inside a collective for another's long work (the lock, the embedding): those
waits are polls of the lock and of marker files, and the collectives that remain last a moment.
"""
