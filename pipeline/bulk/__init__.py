"""Bulks: one input file in, one result per input line out, resumable (the OpenAI Batch API's shape).

``store.BulkStore`` is the front door; ``model`` says what a bulk is, ``records`` keeps it in Redis,
``submission`` turns input lines into jobs, ``progress`` counts and ends it, ``outputs`` writes its
result files. ``manifest`` reads the input, ``cli`` is ``tuwen bulk``, ``report`` and ``mmbench`` build on it.
"""
