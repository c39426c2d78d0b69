"""Offline demo corpus: real piano music (music21 scores, TinySoundFont) and drawn ocean scenes.

`build_demo_corpus` writes a small dataset in the BOPD layout with a CSV manifest; the
pairing rule between scene classes and musical traits is documented in
:mod:`conchshell.data.demo.music` and in ``dataset/README.md``.
"""

from conchshell.data.demo.corpus import DEFAULT, TINY, CorpusSize, build_demo_corpus, draw_example_scenes
from conchshell.data.demo.music import CLASS_TRAITS, ClassTraits
from conchshell.data.demo.scenes import draw_scene

__all__ = ["DEFAULT", "TINY", "CorpusSize", "build_demo_corpus", "CLASS_TRAITS", "ClassTraits", "draw_scene"]
