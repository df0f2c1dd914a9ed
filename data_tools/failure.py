"""The one way a row fails: an exception carrying a short reason code and a human detail.

Reasons are grouped and counted in manifest.json and listed per row in
failures.jsonl, so each stage (fetch, image, caption) raises a subclass with
its own reasons, and the pipeline catches them all as RowFailure.
"""


class RowFailure(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
