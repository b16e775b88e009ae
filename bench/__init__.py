"""dicomflow's benchmarks: each module prints its tables and, with ``--json FILE``, writes the same
figures as JSON. Run them from the project root as ``.venv/bin/python -m bench.<name> [options]``:

- ``bench.ingest``: the ingest stage against a plain pydicom loop (replicated sample, clinical corpus);
- ``bench.series``: CT series through ingest (``unit: series``) against a read-sort-stack loop, memory
  per series, and the 3D network's training images/s;
- ``bench.ingest_memory``: what one large file costs a reader process;
- ``bench.deidentify``: the deidentify stage against dicognito;
- ``bench.validate``: the validate suite against a pandas floor;
- ``bench.scale``: ingest on many files, validate + split on a large manifest;
- ``bench.train``: the train stage's images/s against ``model.fit`` and the bare train step (2D
  networks, and ``resnet3d_small`` on volumes);
- ``bench.medmnist``: the whole pipeline on BreastMNIST (the README's accuracy figures).

``bench.common`` holds what they share; ``bench.clinical_corpus`` writes the clinical-size corpus
(and CT series of 512 x 512 slices).
"""
