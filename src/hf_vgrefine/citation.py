"""The study's BibTeX entry, cited by the grounding_ratio metric and, with its sources, the VGMED dataset card."""

STUDY_CITATION = """\
@inproceedings{liu2026medmllmsfail,
  title     = {How Do Medical MLLMs Fail? A Study on Visual Grounding in Medical Images},
  author    = {Liu and Yu and Ebrahimkhani and Lin and Ng and Cheung},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2026},
  eprint    = {2603.14323},
  archivePrefix = {arXiv}
}
"""
