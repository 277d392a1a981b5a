"""The paper's benchmark suite (Table 1): official on-disk layouts → protocols → one table next to the paper's figures.

``types`` holds what loaders hand to protocols; see ``docs/method.md`` for the evaluation protocol.
"""
