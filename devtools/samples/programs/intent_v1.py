# Intent classifier, version 1: first matching rule wins.
RULES = [
    ("refund", ("refund", "money back", "return")),
    ("cancel", ("cancel", "unsubscribe", "stop")),
    ("order_status", ("where is", "tracking", "shipped", "delivery")),
    ("greeting", ("hello", "hi ", "good morning")),
]


def run(input):
    text = " " + input["text"].lower() + " "
    for intent, phrases in RULES:
        if any(phrase in text for phrase in phrases):
            return intent
    return "other"
