##! Where events travel: publishing handshakes, subscribing to verdicts,
##! and the WebSocket listener.
##!
##! Cluster design. Workers see the packets; the analyzer is a WebSocket
##! client of one node, the manager (zeekctl's ``UseWebSocket`` listens
##! there too). Workers send each handshake to the manager on
##! Cluster::manager_topic, which every backend delivers; the manager
##! publishes it on *handshake_topic*, where a node's own WebSocket clients
##! receive it with the Broker backend as well as with the newer ones. The
##! analyzer publishes verdicts to *verdict_topic*; only the manager (or a
##! standalone node) subscribes to it, so each verdict is handled once, and
##! its stepstone.log line and notice go through the manager (logs reach the
##! logger as usual).
##!
##! Versions, checked in zeek/zeek: Cluster::publish and Cluster::subscribe
##! exist from 7.1 (src/cluster/cluster.bif, base/frameworks/cluster);
##! Broker::publish / Broker::subscribe before. Cluster::listen_websocket
##! exists from 7.2, taking WebSocketServerOptions with $listen_host (a
##! string) in 7.2 and $listen_addr (an addr) from 8.0 ($listen_host is
##! deprecated in 8.0 and gone in 8.1). Broker::listen_websocket(a: string,
##! p: port) exists from 5.0 and is deprecated in 7.2 (NEWS). It serves TLS
##! unless Broker::disable_ssl (zeek/broker src/internal/web_socket.cc,
##! connector.cc): with no certificate an anonymous cipher that WebSocket
##! clients refuse, with one it demands a client certificate. So on Zeek
##! before 7.2 a ws:// client needs ``redef Broker::disable_ssl = T`` (which
##! also drops TLS from the cluster's own Broker peerings): warned at start.
##!
##! Publishing to nobody is not free: on Zeek 8.0.10, Cluster::publish of a
##! handshake costs tens of microseconds of CPU with no subscriber (it wakes
##! Broker's threads; bench/zeek_overhead.py). So a node outside a cluster
##! publishes on *handshake_topic* only while something could receive it: a
##! Broker peer (Broker::peer_added; Zeek 7.0's Broker WebSocket clients are
##! peers too) or a client of Cluster::listen_websocket
##! (Cluster::websocket_client_added, from 7.2). Zeek queues that event
##! before it acknowledges the client's subscriptions (zeek/zeek
##! src/cluster/websocket/WebSocket.cc), so a client misses at most what
##! the same event-queue run publishes, as if it had come a moment later.
##! The local StepStone::handshake event is raised in any case.

@load base/frameworks/broker
@load base/frameworks/cluster
@load ./main
@load ./handshake

module StepStone;

# The node that talks to the analyzer: the manager, or a node outside a
# cluster.
function is_hub(): bool
	{
	return ! Cluster::is_enabled()
	    || Cluster::local_node_type() == Cluster::MANAGER;
	}

# is_hub() and Cluster::is_enabled(), once: the node's role is fixed at
# start.
global hub = T;
global clustered = F;

# Endpoints that could receive a published handshake (see the top).
global receivers: set[string];

function publish_handshake(h: HandshakeInfo)
	{
	if ( ! hub )
		{
@if ( Version::number >= 70100 )
		Cluster::publish(Cluster::manager_topic, StepStone::relay_handshake, h);
@else
		Broker::publish(Cluster::manager_topic, StepStone::relay_handshake, h);
@endif
		return;
		}

	event StepStone::handshake(h);

	if ( |receivers| == 0 && ! clustered )
		return;

@if ( Version::number >= 70100 )
	Cluster::publish(handshake_topic, StepStone::handshake, h);
@else
	Broker::publish(handshake_topic, StepStone::handshake, h);
@endif
	}

# Only the hub handles verdicts (it alone subscribes to verdict_topic), so it
# answers on the topic its WebSocket clients subscribe to.
function publish_verdict_ack(id: string)
	{
@if ( Version::number >= 70100 )
	Cluster::publish(verdict_ack_topic, StepStone::verdict_ack, id);
@else
	Broker::publish(verdict_ack_topic, StepStone::verdict_ack, id);
@endif
	}

event StepStone::relay_handshake(h: HandshakeInfo)
	{
	if ( is_hub() )
		publish_handshake(h);
	}

event Broker::peer_added(endpoint: Broker::EndpointInfo, msg: string)
	{
	add receivers[endpoint$id];
	}

event Broker::peer_lost(endpoint: Broker::EndpointInfo, msg: string)
	{
	delete receivers[endpoint$id];
	}

@ifdef ( Cluster::websocket_client_added )
event Cluster::websocket_client_added(endpoint: Cluster::EndpointInfo,
    subscriptions: string_vec)
	{
	add receivers["websocket/" + endpoint$id];
	}

event Cluster::websocket_client_lost(endpoint: Cluster::EndpointInfo,
    code: count, reason: string)
	{
	delete receivers["websocket/" + endpoint$id];
	}
@endif

event zeek_init() &priority=10
	{
	hub = is_hub();
	clustered = Cluster::is_enabled();
	}

event zeek_init()
	{
	if ( ! is_hub() )
		return;

@if ( Version::number >= 70100 )
	Cluster::subscribe(verdict_topic);
@else
	Broker::subscribe(verdict_topic);
@endif

	if ( websocket_port == 0/tcp )
		return;

@if ( Version::number >= 80000 )
	Cluster::listen_websocket([$listen_addr=websocket_addr,
	    $listen_port=websocket_port]);
@else
@if ( Version::number >= 70200 )
	Cluster::listen_websocket([$listen_host=cat(websocket_addr),
	    $listen_port=websocket_port]);
@else
	if ( ! Broker::disable_ssl )
		Reporter::warning(fmt("StepStone: the WebSocket listener on %s serves TLS only (Broker::disable_ssl = F): ws:// clients cannot connect; redef Broker::disable_ssl = T, or use Zeek 7.2 or later",
		    websocket_port));

	Broker::listen_websocket(cat(websocket_addr), websocket_port);
@endif
@endif
	}
