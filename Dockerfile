# Two images from one file:
#   api    - the HTTP service (no torch, no vLLM)
#   worker - generation (CUDA vLLM) and training workers
FROM scratch AS source
COPY pyproject.toml README.md /app/
COPY cai_dpo /app/cai_dpo
COPY app /app/app
COPY workers /app/workers
COPY migrations /app/migrations
COPY constitutions /constitutions

FROM python:3.11.13-slim-bookworm AS api
COPY --from=source /app /app
COPY --from=source /constitutions /constitutions
WORKDIR /app
RUN pip install --no-cache-dir . && useradd --create-home cai && mkdir -p /data && chown cai /data
USER cai
ENV CAI_DATA_DIR=/data CAI_CONSTITUTIONS_DIR=/constitutions
EXPOSE 8000
CMD ["cai-dpo", "serve", "--host", "0.0.0.0", "--port", "8000"]

# The CUDA vLLM of requirements/gpu.lock (tests/test_compose.py keeps the two equal).
FROM vllm/vllm-openai:v0.20.2 AS worker
COPY --from=source /app /app
COPY --from=source /constitutions /constitutions
WORKDIR /app
RUN pip install --no-cache-dir '.[gpu,train]'
ENV CAI_DATA_DIR=/data CAI_CONSTITUTIONS_DIR=/constitutions
ENTRYPOINT []
CMD ["cai-dpo", "worker", "generate"]
