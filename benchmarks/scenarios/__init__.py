"""The paper's two real-world scenarios (Santurkar et al. 2021, Sec. 3), for users with weights and photos.

- :mod:`benchmarks.scenarios.snow`: VGG16-BN (ImageNet), "snowy road" -> "road" from one exemplar,
  evaluated on photos of vehicles on snow (``python -m benchmarks.scenarios.snow --photos DIR``);
- :mod:`benchmarks.scenarios.typographic`: zero-shot CLIP-RN50, the text "iPod" on a paper -> a blank
  paper, evaluated on clean / blank-paper / "iPod" versions of photos
  (``python -m benchmarks.scenarios.typographic --photos DIR``).

Both compare the edit with local and global fine-tuning on the same single exemplar, print markdown
tables and write JSON (``--out DIR``). Without ``--pretrained`` they run on random weights, which
proves the code path and nothing else. Shared code lives in :mod:`benchmarks.scenarios.common`.
"""
