# Spam filter, version 2: weighted keywords, links and shouting.
import re

WEIGHTS = {"free": 2, "winner": 3, "prize": 3, "click": 2, "urgent": 2, "money": 1, "offer": 1}
LINK = re.compile(r"https?://")


def run(input):
    text = input["text"]
    lowered = text.lower()
    score = sum(weight for word, weight in WEIGHTS.items() if word in lowered)
    score += 2 * len(LINK.findall(text))
    letters = [c for c in text if c.isalpha()]
    if letters and sum(c.isupper() for c in letters) / len(letters) > 0.6:
        score += 2
    return "spam" if score >= 3 else "ham"
