"""Development tools, outside the runtime package: the embedded broker, the dev loop, sample programs and
traffic, and a reference oracle service. A production worker needs none of them."""
