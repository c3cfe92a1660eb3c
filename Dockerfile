# The image deploy/'s Kubernetes Jobs run (capstf train, capstf export), with CUDA for GPUs:
#   docker build -t REGISTRY/capstf:0.1.0 . && docker push REGISTRY/capstf:0.1.0
# then set that name as `image:` in deploy/train.yaml and deploy/export.yaml.
FROM python:3.11-slim
COPY . /src
# requirements.txt pins TensorFlow; its [and-cuda] extra adds the CUDA libraries built for that release.
RUN pip install --no-cache-dir /src \
 && pip install --no-cache-dir "tensorflow[and-cuda]==$(pip show tensorflow | sed -n 's/^Version: //p')" \
 && rm -rf /src
