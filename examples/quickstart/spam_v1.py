# Spam filter, version 1: a keyword list.
# The program contract: define run(input) -> JSON value. `input` is the request's JSON object.

KEYWORDS = ("free", "winner", "prize")


def run(input):
    text = input["text"].lower()
    return "spam" if any(word in text for word in KEYWORDS) else "ham"
