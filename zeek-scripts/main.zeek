##! Options, types, events and the log stream of the StepStone module.

@load base/misc/version
@load base/frameworks/logging
@load base/frameworks/notice

module StepStone;

export {
	## Darknet networks: only connections to these are tracked. Empty means
	## every TCP connection Zeek sees.
	const darknet_subnets: set[subnet] = set() &redef;

	## Topic the handshake events are published to (Zeek -> analyzer).
	const handshake_topic = "stepstone/handshake" &redef;

	## Topic the analyzer publishes verdicts to (analyzer -> Zeek).
	const verdict_topic = "stepstone/verdict" &redef;

	## Address of the WebSocket listener this package opens.
	const websocket_addr = 127.0.0.1 &redef;

	## Port of the WebSocket listener; 0/tcp (the default) opens none, e.g.
	## when zeekctl's ``UseWebSocket`` already opens one on the manager.
	const websocket_port = 0/tcp &redef;

	## How long after the SYN to wait for the client's ACK or RST before
	## publishing the handshake as unanswered. A SYN+ACK retransmitted by the
	## darknet (Linux: after 1, 3, 7, 15, 31 s) can still be answered.
	const reply_wait = 30sec &redef;

	## Which verdicts raise StepStone::Relay_Detected.
	type NoticeRule: enum {
		## The analyzer's relay_confident: an OS mismatch, or a median
		## T^p - T^a margin above max(5 ms, 3 standard errors). No direct
		## host has tripped it in the lab.
		CONFIDENT,
		## The paper's relay: an OS mismatch, or mean T^p above the mean
		## maximum ping with no allowance for noise (flags direct hosts on
		## long fixed-delay paths by a fraction of a millisecond).
		PAPER,
		## Either of the two.
		EITHER,
	};

	## The rule behind Relay_Detected. A verdict from an analyzer that
	## sends no relay_confident is judged by PAPER, and the notice says so.
	option notice_rule = CONFIDENT;

	## How long a noticed source is remembered, so that a later verdict
	## that no longer meets *notice_rule* is logged as a clearing
	## (stepstone.log change=cleared, StepStone::Relay_Cleared).
	const flag_memory = 1day &redef;

	## At most this many SYN+ACK times are sent per handshake (all are
	## counted).
	const max_synacks = 16 &redef;

	## Ports where the server speaks first (SSH, FTP, SMTP, Telnet). On these
	## the package times the darknet's first data (its banner) as the sensor
	## sees it leave, and the client's first data after it (*tapp* in
	## *HandshakeInfo*): a terminating proxy adds its onward leg to that time.
	## Zeek reassembles and delivers these ports' payload (tcp_contents) for
	## this; other ports cost nothing more. A change reaches connections that
	## start after it.
	option server_first_ports: set[port] = {
		21/tcp,
		22/tcp,
		23/tcp,
		25/tcp,
	};

	## On a *server_first_ports* connection whose client answered the SYN+ACK
	## with an ACK, how long after that ACK the handshake waits for the
	## banner and the client's answer before it is published without *tapp*.
	## It is published earlier at the client's first data after the banner.
	const app_wait = 5sec &redef;

	## Bytes of the client's first data kept in *app_data* (the analyzer
	## takes no more).
	const max_app_data = 64;

	## One darknet connection request, as published to the analyzer. Keep
	## the field order: records travel as positional vectors (Broker JSON),
	## and analyzer/zeek.py reads them by position. New fields go at the end.
	type HandshakeInfo: record {
		## Connection uid.
		uid: string;
		## SYN time. A time crosses the WebSocket with millisecond precision
		## only (Broker JSON), hence *syn_epoch*.
		ts: time;
		## SYN time as an interval since the epoch (intervals keep ns).
		syn_epoch: interval;
		orig_h: addr;
		orig_p: port;
		resp_h: addr;
		resp_p: port;
		## The SYN as captured, link layer included (``get_current_packet()$data``),
		## base64-encoded: Zeek writes binary strings unescaped into JSON.
		## Empty when the SYN came through a tunnel Zeek decapsulated.
		syn: string;
		## DLT of the packet source (``packet_source()$link_type``), -1 if unknown.
		link_type: int;
		## ``get_current_packet_header()$l2$encap`` of the SYN. Unlike
		## ``get_current_packet()$link_type`` it is right on Ethernet.
		encap: link_encap;
		## ``$l2$proto`` of the SYN.
		l3: layer3_proto;
		vlan: count &optional;
		inner_vlan: count &optional;
		eth_type: count &optional;
		## SYN+ACKs seen (retransmissions included) before the reply.
		synack_count: count;
		## Their times since the epoch (the first *max_synacks*).
		synacks: vector of interval;
		## "ack", "rst" (the client answered the SYN+ACK with a RST, as
		## stack-less scanners do) or "" (unanswered).
		reply: string;
		## Reply time since the epoch.
		reply_epoch: interval &optional;
		## T^p: reply minus the SYN+ACK it answers. Unset when unanswered,
		## and when more than one SYN+ACK preceded the reply (Karn's rule:
		## which copy the reply answers is unknown).
		tp: interval &optional;
		## On *server_first_ports*: the client's first data after the
		## darknet's first data (its banner) minus the banner, as the sensor
		## saw them. Unset on other ports, without a banner, or when the
		## client sent nothing after it within *app_wait*.
		tapp: interval &optional;
		## The first *max_app_data* bytes of the client's data (those it
		## sent before the banner, if it spoke first), base64-encoded (as
		## *syn*). Set exactly when *tapp* is.
		app_data: string &optional;
	};

	## Published once per darknet connection, when the reply arrives or
	## *reply_wait* ends; on *server_first_ports*, a reply that is an ACK is
	## published when the banner exchange is over or *app_wait* ends. Also
	## raised locally on the publishing node.
	global handshake: event(h: HandshakeInfo);

	## The analyzer's verdict on a source, with the measurement that led to
	## it. Field order is fixed as for *HandshakeInfo*.
	type Verdict: record {
		src: addr;
		## Condition (1): the SYN's OS differs from the probe's SYN+ACK OS.
		cond_os: bool;
		## Condition (2): T^p exceeds the ping RTT (means over the window).
		cond_timing: bool;
		## (1) or (2).
		relay: bool;
		tp_mean: interval &optional;
		ta_max_mean: interval &optional;
		## Timing samples behind the means.
		samples: count;
		## The measurement: its SYN time, darknet address, T^p, ping RTTs
		## and p0f labels of the SYN (fp) and of the probe's SYN+ACK (fa).
		t: time &optional;
		dst: addr &optional;
		tp: interval &optional;
		ping_min: interval &optional;
		ping_avg: interval &optional;
		ping_max: interval &optional;
		fp: string &optional;
		fa: string &optional;
		## Why, in words.
		reasons: string;
		## stepstone's stronger verdict (analyzer/rules.py): an OS
		## mismatch, or a timing margin above the noise. Unset when the
		## analyzer does not send it.
		relay_confident: bool &optional;
		## The strong timing test alone: timing_margin > timing_threshold.
		cond_timing_strong: bool &optional;
		## Median over the window of T^p - T^a, paired per measurement.
		timing_margin: interval &optional;
		## What the margin must exceed: max(5 ms, 3 standard errors).
		timing_threshold: interval &optional;
		## The active reference T^a of that test: "ping" (the probe's
		## maximum ping RTT), "syn" (its SYN probe's RTT) or "ping+syn".
		timing_ref: string &optional;
		## Measurements behind the margin.
		timing_samples: count &optional;
		## Measurements in the window whose SYN OS and probe OS differ.
		os_mismatches: count &optional;
		## The analyzer's id for this verdict. When set, the verdict is
		## confirmed with *verdict_ack* once it is logged; the analyzer
		## sends again what was not confirmed (at least once).
		id: string &optional;
		## What the verdict found (analyzer/rules.py): "forwarding"
		## (timing, hops, or the OS with hops or timing), "terminating"
		## (application-layer timing), "shared" (an OS mismatch, or hops
		## with several client OSes, and no timing: a home NAT or CGN),
		## "none". relay_confident is kind forwarding or terminating.
		kind: string &optional;
		## The evidence that held, "test=margin/samples" each (timing in
		## ms, hops in hops, os and clients as counts).
		evidence: vector of string &optional;
		## Hop counts: the median of the SYN's hop distance minus the
		## probe SYN+ACK's is at least 1 over at least 3 measurements.
		cond_hops: bool &optional;
		## That median, in hops.
		hops_margin: double &optional;
		## Measurements behind it.
		hops_samples: count &optional;
		## Application-layer timing: the median over the window of tapp
		## minus T^a (the timing test's reference), less an allowance for
		## the client's own processing, exceeds the timing test's threshold,
		## over at least 3 answers to our banner (analyzer/rules.py). It
		## makes the kind "terminating": a proxy that ends TCP and opens its
		## own connection onward.
		cond_app: bool &optional;
		## That median, in microseconds.
		app_margin: double &optional;
		## Answers (handshakes with a tapp and a reference) behind it.
		app_samples: count &optional;
	};

	## Published by the analyzer to *verdict_topic*.
	global verdict: event(v: Verdict);

	## Topic of *verdict_ack* (Zeek -> analyzer).
	const verdict_ack_topic = "stepstone/verdict-ack" &redef;

	## Published for each verdict with an *id* once it is logged: the
	## analyzer then lets go of it. A verdict sent again (Zeek restarted
	## before confirming it) is logged again.
	global verdict_ack: event(id: string);

	redef enum Log::ID += { LOG };

	## One line per verdict in stepstone.log.
	type Info: record {
		## When the verdict arrived.
		ts: time &log;
		src: addr &log;
		relay: bool &log;
		cond_os: bool &log;
		cond_timing: bool &log;
		samples: count &log;
		tp_mean: interval &log &optional;
		ta_max_mean: interval &log &optional;
		## SYN time of the measurement behind the verdict.
		syn_ts: time &log &optional;
		dst: addr &log &optional;
		tp: interval &log &optional;
		ping_min: interval &log &optional;
		ping_avg: interval &log &optional;
		ping_max: interval &log &optional;
		fp: string &log &optional;
		fa: string &log &optional;
		reasons: string &log;
		## The verdict's relay_confident (unset if the analyzer sent none).
		relay_confident: bool &log &optional;
		timing_margin: interval &log &optional;
		timing_threshold: interval &log &optional;
		timing_ref: string &log &optional;
		timing_samples: count &log &optional;
		os_mismatches: count &log &optional;
		## The rule under *notice_rule* that this verdict meets ("confident",
		## "paper", "confident+paper"); unset when it meets none.
		noticed_by: string &log &optional;
		## "flagged" when the source starts to meet *notice_rule*, "cleared"
		## when a source flagged within *flag_memory* no longer does.
		change: string &log &optional;
		## The verdict's kind and evidence (see *Verdict*).
		kind: string &log &optional;
		evidence: vector of string &log &optional;
		hops_margin: double &log &optional;
		hops_samples: count &log &optional;
		## The application-layer test (see *Verdict*): median of tapp - T^a,
		## and the answers behind it. Kind "terminating" and the evidence
		## "app=..." say when it held.
		app_margin: interval &log &optional;
		app_samples: count &log &optional;
	};

	global log_policy: Log::PolicyHook;

	## Raised by the analyzer's verdicts that meet *notice_rule*.
	redef enum Notice::Type += {
		## A source that hit the darknet relays for someone else. $src is
		## the source, $sub the rule that fired and by what margin, $msg
		## what was measured (ms). Suppression is per source ($identifier).
		Relay_Detected,
		## A source noticed as Relay_Detected within *flag_memory* whose
		## latest verdict no longer meets *notice_rule*. $sub says why.
		Relay_Cleared,
	};
}

event zeek_init() &priority=5
	{
	Log::create_stream(StepStone::LOG, [$columns=Info, $path="stepstone",
	    $policy=log_policy]);
	}
