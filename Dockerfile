# The loopai image: `loopai worker` by default; any loopai command otherwise.
FROM python:3.11-slim
RUN useradd --uid 1000 --create-home loopai
WORKDIR /src
COPY pyproject.toml README.md ./
COPY app app
COPY devtools devtools
COPY schemas schemas
COPY topics topics
RUN pip install --no-cache-dir . && rm -rf /src
# Not root: RLIMIT_NPROC=0 then holds in the sandbox processes too (root ignores it).
USER loopai
WORKDIR /home/loopai
ENTRYPOINT ["loopai"]
CMD ["worker"]
