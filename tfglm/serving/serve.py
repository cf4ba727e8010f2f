"""`tfglm serve`: TF Serving's REST and gRPC APIs, and OpenAI's, over `tfglm export` directories, for development and
small deployments.

The serving core (`tfglm.serving.core`: the models and their versions, their decode engines, the limits and the metrics)
knows no front; `Server` starts it and puts the fronts before it: gRPC (`tfglm.serving.grpc_api`) on one port, REST
(`tfglm.serving.rest`) and the OpenAI endpoints (`tfglm.serving.openai_api`) on one HTTP server
(`tfglm.serving.http`) on another. Every front turns a `RequestError` into TF Serving's error (HTTP 4xx/503 with
`{"error": ...}`, gRPC INVALID_ARGUMENT, NOT_FOUND, ...) or OpenAI's.
"""

from tfglm.errors import TfglmError
from tfglm.serving import grpc_api, http, openai_api, rest
from tfglm.serving.core import ServerCore


class Server(ServerCore):
    """The serving core behind a gRPC and an HTTP (REST and OpenAI) front.

    A port of 0 binds a free one (read `rest_port` / `grpc_port` after `start`); `rest_api_port=None` disables the
    HTTP front. The other arguments are ServerCore's: the models and the limits. Each version runs in a process of its
    own (`tfglm.serving.version_process`), started by `multiprocessing`'s spawn, which imports the main module: a
    script that starts a Server does so under `if __name__ == "__main__":`.
    """

    def __init__(self, models, host="127.0.0.1", port=8500, rest_api_port=8501, *args, **kwargs):
        super().__init__(models, *args, **kwargs)
        self.host, self.port, self.rest_api_port = host, port, rest_api_port
        self._rest = self._grpc = None

    def start(self):
        """Loads every model's versions and starts polling, then starts the fronts."""
        self.load()
        try:
            self._grpc, self.grpc_port = grpc_api.start(self, self.host, self.port)
            if self.rest_api_port is not None:
                self._rest, self.rest_port = http.start(self, self.host, self.rest_api_port,
                                                        [rest.routes, openai_api.routes])
        except TfglmError:
            self.stop()
            raise
        return self

    def stop(self):
        if self._rest:
            self._rest.stop()
        if self._grpc:
            self._grpc.stop(grace=1).wait()
        self.close()
