"""Which checkpoint is the style: a run's evaluation set, descriptors of style and content, the scores of each
checkpoint, the best one by a stated rule, and runs compared (``stylelora evaluate``, ``compare``, ``sweep``)."""
