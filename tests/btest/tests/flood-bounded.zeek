# A SYN flood nobody answers (1,500 SYNs from random sources at 50/s for 30 s;
# the darknet answers half of them with a SYN+ACK and its retransmissions at
# 1 s and 3 s, no client replies; then 20 s of unrelated packets) leaves no state
# behind: a SYN's track leaves StepStone::tracks *reply_wait* after it at the
# latest, so the table never holds more than the SYNs of the last
# *reply_wait*, and it is empty once the flood is over, while Zeek itself
# still holds the half-open connections. Sampled every 5 s of trace time.
# The trace is written by bench/zeek_overhead.py (standard library only).
#
# @TEST-EXEC: python3 %DIR/../../../bench/zeek_overhead.py --write-flood flood.pcap --flood-syns 1500 --flood-rate 50 --flood-tail 20
# @TEST-EXEC: zeek -b -C -r flood.pcap $PACKAGE %INPUT > output
# @TEST-EXEC: btest-diff output

redef StepStone::darknet_subnets = {198.18.0.0/15};
redef StepStone::websocket_port = 0/tcp;
# Shorter than Zeek's tcp_attempt_delay (5 s), which removes a connection
# the darknet never answered: the tracks leave by reply_wait alone, the same
# on every Zeek version.
redef StepStone::reply_wait = 4sec;

global start: time;
global samples = 0;
global syns: vector of time;
global published = 0;
global largest = 0;
global within = T;
global zeek_conns = 0;

event connection_SYN_packet(c: connection, pkt: SYN_packet)
	{
	if ( pkt$is_orig )
		syns[|syns|] = network_time();
	}

event StepStone::handshake(h: StepStone::HandshakeInfo)
	{
	++published;
	}

event sample()
	{
	if ( zeek_is_terminating() )
		return;

	# The sample's own time: the timers of the tracks due between it and
	# the packet that fired it run right after this one. Half-way between
	# whole seconds, so that no SYN's reply_wait ends at the same instant
	# (which of two timers due together runs first is not fixed).
	local now = start + 2.5sec + samples * 5sec;
	++samples;
	local recent = 0;
	for ( i in syns )
		if ( now - syns[i] <= StepStone::reply_wait )
			++recent;

	local n = |StepStone::tracks|;
	if ( n > largest )
		largest = n;
	if ( n > recent )
		within = F;
	zeek_conns = get_conn_stats()$current_conns;

	print fmt("+%.1fs tracks=%d SYNs in the last reply_wait=%d published=%d",
	    interval_to_double(now - start), n, recent, published);
	schedule 5sec { sample() };
	}

event network_time_init()
	{
	start = network_time();
	schedule 2.5sec { sample() };
	}

event zeek_done()
	{
	print fmt("SYNs %d, published %d, largest table %d, never above the SYNs of one reply_wait: %s",
	    |syns|, published, largest, within);
	print fmt("Zeek's own connections at the last sample: %d", zeek_conns);
	}
