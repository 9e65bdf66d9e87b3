// Beam's job servers take --job-host, but their default ServerFactory builds every gRPC
// server with NettyServerBuilder.forPort(port): it listens on all interfaces, whatever the
// host. For a job server that is a door to running code on the cluster (anyone who reaches
// the job port can submit a pipeline), so ours bind the job and artifact-staging servers
// to the configured host only (LoopbackJobServer.java runs Beam's job service with it).
package ferpipeline.engines;

import java.io.IOException;
import java.net.InetSocketAddress;
import java.util.List;
import java.util.concurrent.TimeUnit;
import org.apache.beam.model.pipeline.v1.Endpoints.ApiServiceDescriptor;
import org.apache.beam.sdk.fn.server.GrpcContextHeaderAccessorProvider;
import org.apache.beam.sdk.fn.server.ServerFactory;
import org.apache.beam.vendor.grpc.v1p60p1.io.grpc.BindableService;
import org.apache.beam.vendor.grpc.v1p60p1.io.grpc.Server;
import org.apache.beam.vendor.grpc.v1p60p1.io.grpc.ServerInterceptors;
import org.apache.beam.vendor.grpc.v1p60p1.io.grpc.netty.NettyServerBuilder;

public final class BoundServerFactory extends ServerFactory {
  // The same limits as Beam's own factory.
  private static final int MAX_INBOUND_MESSAGE_BYTES = Integer.MAX_VALUE;
  private static final long KEEP_ALIVE_SECONDS = 20;

  private final String host;

  public BoundServerFactory(String host) {
    this.host = host;
  }

  /** A server on a free port of the host; the descriptor gets its host:port. */
  @Override
  public Server allocateAddressAndCreate(
      List<BindableService> services, ApiServiceDescriptor.Builder descriptor)
      throws IOException {
    Server server = start(services, new InetSocketAddress(host, 0));
    descriptor.setUrl(host + ":" + server.getPort());
    return server;
  }

  /** A server on the descriptor's port, bound to the host (the descriptor's own host is
   * the same one: the job server builds it from --job-host). */
  @Override
  public Server create(List<BindableService> services, ApiServiceDescriptor descriptor)
      throws IOException {
    String url = descriptor.getUrl();
    int port = Integer.parseInt(url.substring(url.lastIndexOf(':') + 1));
    return start(services, new InetSocketAddress(host, port));
  }

  private static Server start(List<BindableService> services, InetSocketAddress address)
      throws IOException {
    NettyServerBuilder builder = NettyServerBuilder.forAddress(address)
        .maxInboundMessageSize(MAX_INBOUND_MESSAGE_BYTES)
        .permitKeepAliveTime(KEEP_ALIVE_SECONDS, TimeUnit.SECONDS);
    for (BindableService service : services) {
      builder.addService(
          ServerInterceptors.intercept(service, GrpcContextHeaderAccessorProvider.interceptor()));
    }
    return builder.build().start();
  }
}
