# The package's WebSocket listener on this Zeek's branch of transport.zeek
# (Cluster::listen_websocket from 7.2, Broker::listen_websocket before): a
# client subscribes to stepstone/handshake, receives every handshake of the
# recorded trace, and its own event on stepstone/verdict reaches Zeek.
# Zeek holds the trace until the client has subscribed (suspend_processing),
# so nothing depends on timing; a client that fails stops Zeek too. Run on
# Zeek 8.0.10 and 7.0.11. The direct case (port 23) comes out app_wait (5 s)
# after its ACK, within the trace (app.zeek).
#
# @TEST-PORT: WS_PORT
# @TEST-EXEC: btest-bg-run zeek "zeek -b -r $TRACES/handshakes.pcap $PACKAGE %INPUT"
# @TEST-EXEC: python3 $SCRIPTS/ws-client.py $WS_PORT 6 > client.out || { btest-bg-wait -k 1; false; }
# @TEST-EXEC: btest-bg-wait 60
# @TEST-EXEC: btest-diff client.out
# @TEST-EXEC: btest-diff zeek/.stdout

redef StepStone::darknet_subnets = {
	198.18.0.0/15,
	[2001:db8:ffff::]/48
};
redef StepStone::websocket_port = to_port(getenv("WS_PORT"));
# Within the trace, so that the unanswered handshake goes out before the end.
redef StepStone::reply_wait = 1.5sec;

@if ( Version::number < 70200 )
# Broker::listen_websocket serves TLS unless told not to (transport.zeek).
redef Broker::disable_ssl = T;
@endif

module Test;

export {
	global go: event();
	global done: event(n: count, uids: string);
}

event zeek_init()
	{
	suspend_processing();
	}

event Test::go()
	{
	continue_processing();
	}

event StepStone::handshake(h: StepStone::HandshakeInfo)
	{
	print fmt("published %s %s", h$uid, h$orig_h);
	}

event Test::done(n: count, uids: string)
	{
	print fmt("the client received %d handshakes: %s", n, uids);
	terminate();
	}
