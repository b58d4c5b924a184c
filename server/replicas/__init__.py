"""Scale-out: the server's app as a Ray Serve deployment of N engine replicas (`steerserve serve --replicas N`).

`forwarding` and `metrics_merge` are plain Python (no Ray); `deployment` and `launch` import Ray and are imported
only when replicas are asked for."""
