# Review sentiment, version 1: knows only two words of praise, so it calls every other good review negative.


def run(input):
    text = input["text"].lower()
    return "positive" if "great" in text or "love" in text else "negative"
