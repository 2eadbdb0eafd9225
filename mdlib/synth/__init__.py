"""mini-NSD: procedural scenes, a simulated brain, and a writer that uses NSD's exact file formats.

- :mod:`mdlib.synth.scenes`: scenes of coloured shapes, their rendering, captions and numeric descriptions.
- :mod:`mdlib.synth.brain`: a simulated subject (anatomy, ROI atlases, a known encoding model, noise, drifts).
- :mod:`mdlib.synth.behaviour`: each subject's answers in NSD's old/new task, as NSD's ``responses.tsv``.
- :mod:`mdlib.synth.write`: :func:`write_mini_nsd` writes it all at NSD's paths in NSD's formats, plus a
  ground-truth sidecar (``mini_nsd.json``, ``mini_truth/``) read with :func:`load_truth`.

The mini world is described in docs/mini_world.md; its files in docs/data.md, "mini-NSD".
"""

from mdlib.synth.write import (DEFAULTS, SCENES_TRUTH, SIDECAR, ensure_mini_nsd, load_truth, truth_file,
                               write_mini_nsd)

__all__ = ["write_mini_nsd", "ensure_mini_nsd", "load_truth", "truth_file", "DEFAULTS", "SIDECAR", "SCENES_TRUTH"]
