##! Per-connection handshake tracking for darknet connections: the SYN (time
##! and raw bytes), every SYN+ACK, and the client's first ACK or RST.
##!
##! What the events do, as measured on Zeek 8.0.10 (shared/zeek-ws/README.md)
##! and checked against zeek/zeek src/analyzer/protocol/tcp/events.bif:
##! - connection_SYN_packet fires for the SYN (is_orig=T) and for every
##!   SYN+ACK, retransmissions included (is_orig=F); a repeated SYN fires it
##!   again (TCPSessionAdapter.cc raises it for every SYN-flagged segment).
##!   SYN_packet$TSval is optional; this script does not read it.
##! - connection_first_ACK fires on the originator's first ACK, also when it
##!   carries data; connection_reset on a RST (either side: the sender is the
##!   endpoint whose state is TCP_RESET); an unanswered connection only ends
##!   at connection_state_remove.
##! - get_current_packet()$data includes the link layer; its $link_type says
##!   LINK_UNKNOWN even on Ethernet, get_current_packet_header()$l2$encap is
##!   right. Ethernet pads short frames: the analyzer finds the IP header from
##!   the link layer, never from the captured length.
##! Only SYNs to the darknet create state; every other event is one table
##! lookup or one field test for connections outside it. The rules are those
##! of the capture path (analyzer/tracker.py): T^p = reply - the SYN+ACK it
##! answers; more than one SYN+ACK before the reply leaves T^p unset (Karn);
##! the SYN timed is the last one before the first SYN+ACK; a SYN never
##! answered by the darknet gives no handshake. *reply_wait* counts from the first SYN.

@load base/frameworks/cluster
@load ./main

module StepStone;

export {
	## Raised *reply_wait* after a SYN to publish it if still unanswered.
	global reply_timeout: event(uid: string);

	## Workers hand their handshakes to the manager, which publishes them
	## where the WebSocket clients are (see transport.zeek).
	global relay_handshake: event(h: HandshakeInfo);

	## Publishes *h* (cluster-aware); see transport.zeek.
	global publish_handshake: function(h: HandshakeInfo);

	## Takes a handshake answered by an ACK on a *server_first_ports*
	## connection, to publish it after the banner exchange; F for other
	## ports. See app.zeek.
	global hold_for_app: function(h: HandshakeInfo): bool;

	## A darknet connection waiting for the client's reply.
	type Track: record {
		info: HandshakeInfo;
		last_synack: time &optional;
		## The SYN frame, base64-encoded into *info$syn* only when the
		## handshake is published (most SYNs of a flood never are).
		frame: string &optional;
	};

	## Connections waiting for their reply, keyed by uid. An entry leaves
	## when its handshake is published or dropped: at the client's reply,
	## *reply_wait* after the SYN at the latest, or when Zeek removes the
	## connection first. So under a SYN flood the table holds at most the
	## SYNs of one *reply_wait*. Exported so that its size can be watched
	## (bench/zeek_overhead.py, tests/btest/tests/flood-bounded.zeek).
	global tracks: table[string] of Track;
}

redef record connection += {
	## Set on a darknet connection's first SYN, for the connection's life:
	## a SYN repeated after its handshake left *tracks* starts nothing.
	stepstone_seen: bool &optional;
};

# Times travel as intervals since the epoch (see HandshakeInfo).
const epoch = double_to_time(0.0);

# packet_source()$link_type, once: it is the same for every packet of a run.
global link_type = -2;

# The SYN's bytes and link-layer facts, from the packet in hand.
function take_frame(c: connection, t: Track, hdr: raw_pkt_hdr)
	{
	local pkt = get_current_packet();

	# A decapsulated tunnel's frame is the outer packet: its IP header is
	# not this SYN's, so no bytes rather than wrong ones.
	if ( ! c?$tunnel && pkt?$data )
		t$frame = pkt$data;

	if ( link_type == -2 )
		{
		local src = packet_source();
		link_type = src?$link_type ? src$link_type : -1;
		}

	local info = t$info;
	info$link_type = link_type;

	if ( hdr?$l2 )
		{
		local l2 = hdr$l2;
		info$encap = l2$encap;
		info$l3 = l2$proto;

		if ( l2?$vlan )
			info$vlan = l2$vlan;

		if ( l2?$inner_vlan )
			info$inner_vlan = l2$inner_vlan;

		if ( l2?$eth_type )
			info$eth_type = l2$eth_type;
		}
	}

function start(c: connection, hdr: raw_pkt_hdr)
	{
	local now = network_time();
	# A typed empty vector: the record constructor gets no untyped vector().
	local synacks: vector of interval = vector();
	local t = Track($info=HandshakeInfo($uid=c$uid, $ts=now,
	    $syn_epoch=now - epoch, $orig_h=c$id$orig_h, $orig_p=c$id$orig_p,
	    $resp_h=c$id$resp_h, $resp_p=c$id$resp_p, $syn="", $link_type=-1,
	    $encap=LINK_UNKNOWN, $l3=L3_UNKNOWN, $synack_count=0,
	    $synacks=synacks, $reply=""));
	take_frame(c, t, hdr);
	tracks[c$uid] = t;
	schedule reply_wait { StepStone::reply_timeout(c$uid) };
	}

function finish(t: Track, reply: string)
	{
	if ( t$info$synack_count == 0 )
		{
		# The darknet never answered this SYN: there is no handshake to
		# measure (analyzer/tracker.py's no_synack). A reply now answers
		# nothing of ours; at the end, nothing is published.
		if ( reply == "" )
			delete tracks[t$info$uid];
		return;
		}

	delete tracks[t$info$uid];

	if ( reply != "" )
		{
		local now = network_time();
		t$info$reply = reply;
		t$info$reply_epoch = now - epoch;

		# Karn's rule: only with a single SYN+ACK before the reply is it
		# known which SYN+ACK the reply answers.
		if ( t$info$synack_count == 1 && t?$last_synack )
			t$info$tp = now - t$last_synack;
		}

	if ( t?$frame )
		t$info$syn = encode_base64(t$frame);

	if ( reply == "ack" && hold_for_app(t$info) )
		return;

	publish_handshake(t$info);
	}

event connection_SYN_packet(c: connection, pkt: SYN_packet)
	{
	if ( ! pkt$is_orig )
		{
		if ( c$uid !in tracks )
			return;

		local t = tracks[c$uid];
		local at = network_time();
		++t$info$synack_count;
		t$last_synack = at;

		if ( |t$info$synacks| < max_synacks )
			t$info$synacks[|t$info$synacks|] = at - epoch;
		return;
		}

	if ( c?$stepstone_seen )
		{
		# A repeated SYN before the darknet answered: its first SYN+ACK
		# answers the latest SYN, so that one is the SYN to time and
		# fingerprint (as analyzer/tracker.py). After a SYN+ACK, a repeated
		# SYN only provokes another SYN+ACK, which Karn's rule handles.
		if ( c$uid in tracks )
			{
			local pending = tracks[c$uid];
			if ( pending$info$synack_count == 0 )
				{
				local now = network_time();
				pending$info$ts = now;
				pending$info$syn_epoch = now - epoch;
				take_frame(c, pending, get_current_packet_header());
				}
			}
		return;
		}

	if ( |darknet_subnets| > 0 && c$id$resp_h !in darknet_subnets )
		return;

	# A SYN+ACK captured before its SYN (real in
	# tests/btest/Traces/vnc-scanner.pcap) comes first as the
	# originator's "SYN" until the SYN flips the connection: no
	# SYN to time or fingerprint, no handshake. A SYN that came through a
	# tunnel Zeek decapsulated has the outer packet's header, without $tcp:
	# it is taken as the SYN it was raised as.
	local hdr = get_current_packet_header();
	if ( hdr?$tcp && ( hdr$tcp$flags & 16 ) != 0 )
		return;

	c$stepstone_seen = T;
	start(c, hdr);
	}

event connection_first_ACK(c: connection)
	{
	if ( c$uid !in tracks )
		return;

	# A RST+ACK raises connection_first_ACK first, then connection_reset
	# (TCPSessionAdapter::DeliverPacket checks the ACK before the state
	# machine sees the RST). Both handlers run after the packet, and
	# building connection_reset refreshed c$orig$state, so a RST+ACK is
	# seen here as the RST it is (as analyzer/tracker.py counts it).
	local reply = c$orig$state == TCP_RESET ? "rst" : "ack";
	finish(tracks[c$uid], reply);
	}

event connection_reset(c: connection)
	{
	# Only the client's RST answers our SYN+ACK.
	if ( c$uid in tracks && c$orig$state == TCP_RESET )
		finish(tracks[c$uid], "rst");
	}

event StepStone::reply_timeout(uid: string)
	{
	if ( uid in tracks )
		finish(tracks[uid], "");
	}

event connection_state_remove(c: connection)
	{
	if ( c$uid in tracks )
		finish(tracks[c$uid], "");
	}
